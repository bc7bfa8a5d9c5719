//! The runner binary the daemon serves to its guests: where it is, and its size and sha256, read
//! once at start-up. The sha256 goes into every sandbox's user-data, so the guest installs the
//! runner only if what it downloaded is that file; a binary replaced while the daemon runs is
//! refused by the guests until the daemon restarts and reads it again.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The runner's file name beside the daemon's executable.
const RUNNER_FILE: &str = "agentlab-runner";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerBinary {
    pub path: PathBuf,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerBinaryError {
    #[error("runner_path {path}: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("runner_path {0}: not a regular file")]
    NotAFile(PathBuf),
}

impl RunnerBinary {
    /// The runner the config names (`runner_path`; an empty path: none), or the one beside the
    /// daemon's own executable if there is one. A configured path that cannot be read is an
    /// error; a missing default is not (templates then bring their own runner).
    pub fn locate(configured: Option<&Path>) -> Result<Option<RunnerBinary>, RunnerBinaryError> {
        match configured {
            Some(path) if path.as_os_str().is_empty() => Ok(None),
            Some(path) => RunnerBinary::read(path).map(Some),
            None => {
                let beside = std::env::current_exe()
                    .ok()
                    .and_then(|exe| exe.parent().map(|dir| dir.join(RUNNER_FILE)));
                match beside {
                    Some(path) if path.is_file() => RunnerBinary::read(&path).map(Some),
                    _ => Ok(None),
                }
            }
        }
    }

    /// Reads `path` whole to measure it. Blocking.
    pub fn read(path: &Path) -> Result<RunnerBinary, RunnerBinaryError> {
        let unreadable = |source| RunnerBinaryError::Unreadable {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(unreadable)?;
        if !file.metadata().map_err(unreadable)?.is_file() {
            return Err(RunnerBinaryError::NotAFile(path.to_owned()));
        }
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buffer).map_err(unreadable)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            size += n as u64;
        }
        Ok(RunnerBinary {
            path: path.to_owned(),
            size,
            sha256: hex::encode(hasher.finalize()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_the_configured_runner_and_refuses_what_is_not_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentlab-runner");
        std::fs::write(&path, b"abc").unwrap();
        let runner = RunnerBinary::locate(Some(&path)).unwrap().unwrap();
        assert_eq!(runner.size, 3);
        assert_eq!(
            runner.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(RunnerBinary::locate(Some(Path::new(""))).unwrap(), None);
        assert!(RunnerBinary::locate(Some(&dir.path().join("missing"))).is_err());
        assert!(matches!(
            RunnerBinary::locate(Some(dir.path())),
            Err(RunnerBinaryError::NotAFile(_))
        ));
    }
}
