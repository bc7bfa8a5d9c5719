//! Artifact uploads: a guest streams a file in chunks; a blocking writer hashes them into a scratch
//! file and, once the upload is complete, makes it durable and renames it into place. An upload
//! over the cap, interrupted or dropped leaves nothing behind.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{JobFiles, JobFilesError};

/// What a completed upload stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredArtifact {
    pub size: u64,
    /// Lower-case hex SHA-256 of the content.
    pub sha256: String,
}

enum Chunk {
    Data(Vec<u8>),
    /// Everything arrived: make the file durable and move it into place.
    Commit,
}

/// One artifact being uploaded. Feed it with `write`, then `commit`; dropping it (or `abort`)
/// discards what was written.
#[derive(Debug)]
pub struct ArtifactUpload {
    relative: String,
    max: u64,
    received: u64,
    tx: Option<mpsc::Sender<Chunk>>,
    writer: JoinHandle<std::io::Result<StoredArtifact>>,
}

impl JobFiles {
    /// Starts the upload of the job's artifact `relative`. `declared` is the size the client
    /// announced, if any: over the cap, the upload is refused before anything is written.
    pub fn start_artifact(
        &self,
        job_id: &str,
        relative: &str,
        declared: Option<u64>,
    ) -> Result<ArtifactUpload, JobFilesError> {
        let dest = self.artifact_path(job_id, relative)?;
        let max = self.limits.artifact_max_bytes;
        if declared.is_some_and(|n| n > max) {
            return Err(too_large(relative, max));
        }
        let scratch = self.artifact_scratch();
        let tmp = scratch.join(crate::model::new_id());
        let (tx, rx) = mpsc::channel::<Chunk>(32);
        let writer = tokio::task::spawn_blocking(move || write_artifact(rx, &scratch, &tmp, &dest));
        Ok(ArtifactUpload {
            relative: relative.to_owned(),
            max,
            received: 0,
            tx: Some(tx),
            writer,
        })
    }
}

fn too_large(relative: &str, limit: u64) -> JobFilesError {
    JobFilesError::TooLarge {
        what: format!("artifact `{relative}`"),
        limit,
    }
}

impl ArtifactUpload {
    /// Adds a chunk. Past the cap the upload fails and what was written is discarded.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), JobFilesError> {
        self.received += chunk.len() as u64;
        if self.received > self.max {
            self.tx = None;
            return Err(too_large(&self.relative, self.max));
        }
        let sent = match &self.tx {
            Some(tx) => tx.send(Chunk::Data(chunk.to_vec())).await.is_ok(),
            None => false,
        };
        if !sent {
            // The writer stopped: its own error says why.
            self.tx = None;
        }
        Ok(())
    }

    /// Finishes the upload: the artifact is durable at its place when this returns Ok.
    pub async fn commit(mut self) -> Result<StoredArtifact, JobFilesError> {
        if let Some(tx) = self.tx.take() {
            // A failed send means the writer already stopped; awaiting it gives its error.
            let _ = tx.send(Chunk::Commit).await;
        }
        let relative = self.relative.clone();
        self.finish().await.map_err(|err| match err {
            JobFilesError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::Interrupted =>
            {
                JobFilesError::Incomplete(relative)
            }
            other => other,
        })
    }

    /// Gives the upload up and waits until its scratch file is gone.
    pub async fn abort(mut self) {
        self.tx = None;
        let _ = self.finish().await;
    }

    async fn finish(self) -> Result<StoredArtifact, JobFilesError> {
        drop(self.tx);
        let context = format!("storing artifact `{}`", self.relative);
        self.writer
            .await
            .map_err(|e| JobFilesError::TaskFailed(e.to_string()))?
            .map_err(JobFilesError::io(context))
    }
}

/// Writes chunks to a scratch file while hashing them; on `Commit`, fsyncs and renames it into
/// place. If the channel closes without `Commit`, the scratch file is removed.
fn write_artifact(
    mut rx: mpsc::Receiver<Chunk>,
    scratch: &Path,
    tmp: &Path,
    dest: &Path,
) -> std::io::Result<StoredArtifact> {
    std::fs::create_dir_all(scratch)?;
    let mut file = std::fs::File::create(tmp)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let result = (|| {
        while let Some(chunk) = rx.blocking_recv() {
            match chunk {
                Chunk::Data(bytes) => {
                    file.write_all(&bytes)?;
                    hasher.update(&bytes);
                    size += bytes.len() as u64;
                }
                Chunk::Commit => {
                    file.sync_all()?;
                    let parent = dest.parent().map(PathBuf::from).unwrap_or_default();
                    std::fs::create_dir_all(&parent)?;
                    std::fs::rename(tmp, dest)?;
                    std::fs::File::open(&parent)?.sync_all()?;
                    return Ok(());
                }
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "upload aborted",
        ))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result.map(|()| StoredArtifact {
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{files, ROOMY};
    use super::super::Limits;
    use super::*;

    fn scratch_is_empty(files: &JobFiles) -> bool {
        std::fs::read_dir(files.artifact_scratch())
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(true)
    }

    #[tokio::test]
    async fn a_committed_upload_is_in_place_with_its_size_and_hash() {
        let (_dir, files) = files(ROOMY);
        let mut upload = files.start_artifact("j1", "out/a.txt", None).unwrap();
        upload.write(b"hello ").await.unwrap();
        upload.write(b"world").await.unwrap();
        let stored = upload.commit().await.unwrap();
        assert_eq!(stored.size, 11);
        assert_eq!(stored.sha256, hex::encode(Sha256::digest(b"hello world")));
        let path = files.artifact_path("j1", "out/a.txt").unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"hello world");
        assert!(scratch_is_empty(&files));
    }

    #[tokio::test]
    async fn an_escaping_path_is_refused_before_anything_is_written() {
        let (dir, files) = files(ROOMY);
        let err = files.start_artifact("j1", "../../etc/x", None).unwrap_err();
        assert!(matches!(err, JobFilesError::PathNotConfined(_)), "{err}");
        assert!(!dir.path().join("artifacts").exists());
    }

    #[tokio::test]
    async fn a_declared_size_over_the_cap_is_refused() {
        let (_dir, files) = files(Limits {
            artifact_max_bytes: 4,
            ..ROOMY
        });
        assert!(files.start_artifact("j1", "a", Some(4)).is_ok());
        let err = files.start_artifact("j1", "a", Some(5)).unwrap_err();
        assert!(
            matches!(err, JobFilesError::TooLarge { limit: 4, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("artifact `a`"), "{err}");
    }

    #[tokio::test]
    async fn streaming_past_the_cap_fails_and_leaves_nothing() {
        let (_dir, files) = files(Limits {
            artifact_max_bytes: 4,
            ..ROOMY
        });
        let mut upload = files.start_artifact("j1", "a", None).unwrap();
        upload.write(b"abc").await.unwrap();
        let err = upload.write(b"de").await.unwrap_err();
        assert!(matches!(err, JobFilesError::TooLarge { .. }), "{err}");
        upload.abort().await;
        assert!(!files.artifact_path("j1", "a").unwrap().exists());
        assert!(scratch_is_empty(&files));
    }

    #[tokio::test]
    async fn an_aborted_or_dropped_upload_leaves_nothing() {
        let (_dir, files) = files(ROOMY);
        let mut upload = files.start_artifact("j1", "a", None).unwrap();
        upload.write(b"partial").await.unwrap();
        upload.abort().await;
        assert!(!files.artifact_path("j1", "a").unwrap().exists());
        assert!(scratch_is_empty(&files));

        let mut upload = files.start_artifact("j1", "b", None).unwrap();
        // More chunks than the channel holds: the last write returns only once the writer has
        // started, so its scratch file exists and an empty scratch folder means it cleaned up.
        for _ in 0..40 {
            upload.write(b"partial").await.unwrap();
        }
        drop(upload);
        // The writer notices the closed channel on its own, on the blocking pool: wait for it,
        // as long as a loaded host needs (this is about whether it cleans up, not how fast).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !scratch_is_empty(&files) && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(scratch_is_empty(&files));
        assert!(!files.artifact_path("j1", "b").unwrap().exists());
    }
}
