//! The TCP control listener's bearer token. It is read once, at start-up, from
//! `control_token_file`, which must be non-empty and reachable by no one but the daemon's user and
//! group (anyone else who could read it could drive the daemon, anyone who could write it could
//! choose the token). Only a SHA-256 of the token is kept, and each request's token is compared by
//! its SHA-256 in constant time: neither the position of the first wrong byte nor the length of the
//! token shows in the time an answer takes.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::HttpError;

/// The expected token, as its digest.
pub struct ControlToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for ControlToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlToken(..)")
    }
}

/// A token file longer than this is not a token file.
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

impl ControlToken {
    /// Reads and checks the token file. Blocking: call it off the async executor.
    pub fn load(path: &Path) -> Result<ControlToken, HttpError> {
        let unreadable = |source| HttpError::Token {
            path: path.to_owned(),
            source,
        };
        // One open for the checks and the read: the file checked is the file read.
        let file = std::fs::File::open(path).map_err(unreadable)?;
        let meta = file.metadata().map_err(unreadable)?;
        let exposed = |reason: String| HttpError::TokenExposed {
            path: path.to_owned(),
            reason,
        };
        if let Some(reason) = exposure(
            meta.mode(),
            meta.uid(),
            meta.gid(),
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        ) {
            return Err(exposed(reason));
        }
        let mut text = String::new();
        file.take(MAX_TOKEN_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(unreadable)?;
        if text.len() as u64 > MAX_TOKEN_FILE_BYTES {
            return Err(HttpError::TokenTooLong(path.to_owned()));
        }
        let token = text.trim();
        if token.is_empty() {
            return Err(HttpError::TokenEmpty(path.to_owned()));
        }
        Ok(ControlToken {
            digest: digest(token.as_bytes()),
        })
    }

    /// Whether `given` is the token; the same work whatever `given` is.
    pub fn matches(&self, given: &[u8]) -> bool {
        let given = digest(given);
        let difference = given
            .iter()
            .zip(&self.digest)
            .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
        difference == 0
    }
}

/// Why a file of `mode`, owned by `uid`:`gid`, is reachable by others than the daemon's user
/// (`euid`) and group (`egid`); None if it is not.
fn exposure(mode: u32, uid: u32, gid: u32, euid: u32, egid: u32) -> Option<String> {
    let mode = mode & 0o7777;
    if mode & 0o006 != 0 {
        return Some(format!(
            "can be read or written by every user (mode {mode:04o}); chmod 600 it"
        ));
    }
    if mode & 0o060 != 0 && gid != egid {
        return Some(format!(
            "can be read or written by group {gid}, which is not the daemon's (mode {mode:04o}); \
             chmod 600 it"
        ));
    }
    if uid != euid && uid != 0 {
        return Some(format!(
            "belongs to user {uid}, neither the daemon's user nor root; chown it"
        ));
    }
    None
}

/// The token `control_listen` needs, read from `control_token_file`; None without a TCP listener.
pub fn load_for(
    control_listen: Option<std::net::SocketAddr>,
    token_file: Option<&PathBuf>,
) -> Result<Option<ControlToken>, HttpError> {
    match (control_listen, token_file) {
        (Some(_), Some(path)) => ControlToken::load(path).map(Some),
        // Config validation refuses a listener without a token file; never serve one open.
        (Some(addr), None) => Err(HttpError::TokenMissing(addr.to_string())),
        (None, _) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn token_file(text: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, path)
    }

    #[test]
    fn a_private_token_file_gives_a_token_that_matches_only_itself() {
        let (_dir, path) = token_file("  s3cret-token-value\n", 0o600);
        let token = ControlToken::load(&path).unwrap();
        assert!(token.matches(b"s3cret-token-value"));
        for wrong in [
            &b""[..],
            b"s3cret-token-valuE",
            b"s3cret-token-value\n",
            b"s3cret",
        ] {
            assert!(!token.matches(wrong), "{wrong:?}");
        }
        assert_eq!(format!("{token:?}"), "ControlToken(..)");
    }

    #[test]
    fn an_empty_missing_or_exposed_token_file_is_refused_by_name() {
        for (text, mode, says) in [
            ("", 0o600, "is empty"),
            (" \n\t\n", 0o600, "is empty"),
            ("tok3n-tok3n", 0o644, "every user"),
            ("tok3n-tok3n", 0o602, "every user"),
        ] {
            let (_dir, path) = token_file(text, mode);
            let err = ControlToken::load(&path).unwrap_err().to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains(says), "{mode:o} {text:?}: {err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = ControlToken::load(&missing).unwrap_err().to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
        let (_dir, path) = token_file(&"x".repeat(5000), 0o600);
        assert!(matches!(
            ControlToken::load(&path),
            Err(HttpError::TokenTooLong(_))
        ));
    }

    #[test]
    fn group_access_is_for_the_daemon_s_own_group_and_the_owner_is_the_daemon_or_root() {
        assert_eq!(exposure(0o100600, 1000, 1000, 1000, 1000), None);
        assert_eq!(exposure(0o100640, 1000, 50, 1000, 50), None);
        assert_eq!(exposure(0o100400, 0, 0, 1000, 1000), None, "root's file");
        assert!(exposure(0o100640, 1000, 50, 1000, 1000)
            .unwrap()
            .contains("group 50"));
        assert!(exposure(0o100604, 1000, 1000, 1000, 1000)
            .unwrap()
            .contains("every user"));
        assert!(exposure(0o100600, 1001, 1000, 1000, 1000)
            .unwrap()
            .contains("user 1001"));
    }

    #[test]
    fn a_listener_needs_a_token_file() {
        let addr = Some("127.0.0.1:9".parse().unwrap());
        assert!(matches!(
            load_for(addr, None),
            Err(HttpError::TokenMissing(_))
        ));
        assert!(load_for(None, None).unwrap().is_none());
    }
}
