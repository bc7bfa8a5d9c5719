//! Artifact uploads: a guest streams a file in chunks; each chunk is hashed on arrival and written
//! to a scratch file with `tokio::fs` (one short blocking call per write, so no thread waits on the
//! guest between chunks); once the upload is complete it is made durable and, in one short
//! blocking step, renamed into place, never through a symlink. An upload over a cap, interrupted
//! or dropped leaves nothing behind.
//!
//! Quotas: one artifact is capped at `artifact_max_bytes`; a job's artifacts together at
//! `artifact_job_max_bytes` and `artifact_max_files`. The caller says how much the job's *other*
//! artifacts use (`ArtifactUsage`, from the store): a re-upload of a path replaces it, so it is
//! counted once, at its new size. The check at the start and while streaming refuses early; the
//! check that holds is the one at commit, made during the job's commit turn with the usage read
//! once the turn is held, so parallel uploads cannot together pass the quota.

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::locks::JobLockGuard;
use super::{spawn_blocking, JobFiles, JobFilesError, Limits, Quota};
use crate::model::ArtifactUsage;

/// What a completed upload stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredArtifact {
    pub size: u64,
    /// Lower-case hex SHA-256 of the content.
    pub sha256: String,
}

/// One artifact being uploaded. Feed it with `write`, then `commit`; dropping it (or `abort`)
/// discards what was written.
#[derive(Debug)]
pub struct ArtifactUpload {
    job_id: String,
    relative: String,
    /// The job's artifact folder, and the path's parts below it.
    job_dir: PathBuf,
    parts: Vec<String>,
    tmp: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: Sha256,
    received: u64,
    /// The cap streaming must stay under: the per-artifact one, or what the job has left.
    cap: (u64, Quota),
    limits: Limits,
    /// Set once the scratch file is gone or renamed: nothing left for `Drop` to remove.
    settled: bool,
}

/// The job's turn to commit an artifact, from `JobFiles::artifact_turn`.
#[derive(Debug)]
pub struct CommitTurn<'a> {
    job_id: String,
    _held: JobLockGuard<'a>,
}

impl JobFiles {
    /// Starts the upload of the job's artifact `relative`, its job's other artifacts using
    /// `usage`. `declared` is the size the client announced, if any: over a cap, the upload is
    /// refused before anything is written.
    pub async fn start_artifact(
        &self,
        job_id: &str,
        relative: &str,
        declared: Option<u64>,
        usage: ArtifactUsage,
    ) -> Result<ArtifactUpload, JobFilesError> {
        self.artifact_path(job_id, relative)?;
        let parts = path_parts(relative);
        let cap = self.upload_cap(relative, usage)?;
        if declared.is_some_and(|n| n > cap.0) {
            return Err(over(relative, cap.1));
        }
        let scratch = self.artifact_scratch();
        tokio::fs::create_dir_all(&scratch)
            .await
            .map_err(JobFilesError::io(format!("creating {}", scratch.display())))?;
        let tmp = scratch.join(crate::model::new_id());
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(JobFilesError::io(format!("creating {}", tmp.display())))?;
        Ok(ArtifactUpload {
            job_id: job_id.to_owned(),
            relative: relative.to_owned(),
            job_dir: self.artifacts_dir(job_id),
            parts,
            tmp,
            file: Some(file),
            hasher: Sha256::new(),
            received: 0,
            cap,
            limits: self.limits,
            settled: false,
        })
    }

    /// Waits for the job's turn to commit an artifact. Held from reading the job's usage to
    /// recording the artifact, it makes the quota check, the rename and the record one step.
    pub async fn artifact_turn(&self, job_id: &str) -> CommitTurn<'_> {
        CommitTurn {
            job_id: job_id.to_owned(),
            _held: self.artifact_commits.lock(job_id).await,
        }
    }

    /// How large the artifact may be, and which quota says so; refused outright when the job
    /// has no artifact left to store.
    fn upload_cap(
        &self,
        relative: &str,
        usage: ArtifactUsage,
    ) -> Result<(u64, Quota), JobFilesError> {
        let limits = self.limits;
        if usage.files >= limits.artifact_max_files {
            return Err(over(
                relative,
                Quota::ArtifactFiles(limits.artifact_max_files),
            ));
        }
        let left = limits.artifact_job_max_bytes.saturating_sub(usage.bytes);
        Ok(if left < limits.artifact_max_bytes {
            (left, Quota::ArtifactTotal(limits.artifact_job_max_bytes))
        } else {
            (
                limits.artifact_max_bytes,
                Quota::ArtifactSize(limits.artifact_max_bytes),
            )
        })
    }
}

fn over(relative: &str, quota: Quota) -> JobFilesError {
    JobFilesError::OverQuota {
        what: format!("artifact `{relative}`"),
        quota,
    }
}

/// The normal parts of a path `join_confined` accepted.
fn path_parts(relative: &str) -> Vec<String> {
    Path::new(relative)
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect()
}

impl ArtifactUpload {
    /// Adds a chunk. Past the cap the upload fails and what was written is discarded.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), JobFilesError> {
        self.received += chunk.len() as u64;
        if self.received > self.cap.0 {
            self.discard().await;
            return Err(over(&self.relative, self.cap.1));
        }
        let Some(file) = self.file.as_mut() else {
            return Err(JobFilesError::Incomplete(self.relative.clone()));
        };
        self.hasher.update(chunk);
        if let Err(source) = file.write_all(chunk).await {
            self.discard().await;
            return Err(self.io_error(source));
        }
        Ok(())
    }

    /// Finishes the upload during the job's commit `turn`, its job's other artifacts using
    /// `usage` (read once the turn was held): the artifact is durable at its place when this
    /// returns Ok.
    pub async fn commit(
        mut self,
        turn: &CommitTurn<'_>,
        usage: ArtifactUsage,
    ) -> Result<StoredArtifact, JobFilesError> {
        if turn.job_id != self.job_id {
            return Err(JobFilesError::TaskFailed(format!(
                "the commit turn of job {} was given to an upload of job {}",
                turn.job_id, self.job_id
            )));
        }
        if let Err(err) = self.check_quota(usage) {
            self.discard().await;
            return Err(err);
        }
        let Some(mut file) = self.file.take() else {
            return Err(JobFilesError::Incomplete(self.relative.clone()));
        };
        let synced = match file.flush().await {
            Ok(()) => file.sync_all().await,
            Err(err) => Err(err),
        };
        drop(file);
        if let Err(source) = synced {
            self.discard().await;
            return Err(self.io_error(source));
        }
        let (job_dir, parts, tmp) = (self.job_dir.clone(), self.parts.clone(), self.tmp.clone());
        let placed = spawn_blocking(move || place(&job_dir, &parts, &tmp)).await;
        let placed = match placed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Placement::Symlink)) => {
                Err(JobFilesError::PathNotConfined(self.relative.clone()))
            }
            Ok(Err(Placement::Clash)) => Err(JobFilesError::PathConflict(self.relative.clone())),
            Ok(Err(Placement::Io(source))) => Err(self.io_error(source)),
            Err(err) => Err(err),
        };
        if let Err(err) = placed {
            self.discard().await;
            return Err(err);
        }
        self.settled = true;
        Ok(StoredArtifact {
            size: self.received,
            sha256: hex::encode(std::mem::take(&mut self.hasher).finalize()),
        })
    }

    /// The job's quotas against its usage at commit, with this artifact at its full size.
    fn check_quota(&self, usage: ArtifactUsage) -> Result<(), JobFilesError> {
        let limits = self.limits;
        if usage.files >= limits.artifact_max_files {
            return Err(over(
                &self.relative,
                Quota::ArtifactFiles(limits.artifact_max_files),
            ));
        }
        if usage.bytes.saturating_add(self.received) > limits.artifact_job_max_bytes {
            return Err(over(
                &self.relative,
                Quota::ArtifactTotal(limits.artifact_job_max_bytes),
            ));
        }
        Ok(())
    }

    /// Gives the upload up and waits until its scratch file is gone.
    pub async fn abort(mut self) {
        self.discard().await;
    }

    async fn discard(&mut self) {
        drop(self.file.take());
        if !self.settled {
            let _ = tokio::fs::remove_file(&self.tmp).await;
            self.settled = true;
        }
    }

    fn io_error(&self, source: std::io::Error) -> JobFilesError {
        JobFilesError::Io {
            context: format!("storing artifact `{}`", self.relative),
            source,
        }
    }
}

impl Drop for ArtifactUpload {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let tmp = std::mem::take(&mut self.tmp);
        // An unlink is short, but it is still blocking file IO: off the executor when there is one.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || std::fs::remove_file(tmp))),
            Err(_) => drop(std::fs::remove_file(tmp)),
        }
    }
}

/// Why an artifact could not be put in place.
#[derive(Debug)]
enum Placement {
    /// A part of the path, or the path itself, is a symlink.
    Symlink,
    /// A part of the path is a file, or the path is a folder.
    Clash,
    Io(std::io::Error),
}

impl From<Errno> for Placement {
    fn from(errno: Errno) -> Self {
        Placement::Io(errno.into())
    }
}

/// Renames `tmp` to `job_dir/parts…`, creating the folders on the way, and makes the rename
/// durable. Each folder is opened relative to the one above it without following symlinks, so
/// nothing is written outside `job_dir` whatever its tree holds.
fn place(job_dir: &Path, parts: &[String], tmp: &Path) -> Result<(), Placement> {
    let (Some(name), Some(job)) = (parts.last(), job_dir.file_name()) else {
        return Err(Placement::Clash);
    };
    let root = job_dir.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(root).map_err(Placement::Io)?;
    // The artifacts root is the operator's (it may be a symlink); below it nothing is followed.
    let mut dir = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    let below = std::iter::once(job.to_string_lossy().into_owned())
        .chain(parts[..parts.len() - 1].iter().cloned());
    for part in below {
        dir = open_folder(&dir, &part)?;
    }
    match rustix::fs::statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => {}
            FileType::Symlink => return Err(Placement::Symlink),
            _ => return Err(Placement::Clash),
        },
        Err(Errno::NOENT) => {}
        Err(errno) => return Err(errno.into()),
    }
    rustix::fs::renameat(rustix::fs::CWD, tmp, &dir, name.as_str())?;
    rustix::fs::fsync(&dir)?;
    Ok(())
}

/// Opens (creating if needed) the folder `name` in `parent`, refusing a symlink or a file.
fn open_folder(parent: &OwnedFd, name: &str) -> Result<OwnedFd, Placement> {
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(errno) => return Err(errno.into()),
    }
    match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => match FileType::from_raw_mode(stat.st_mode) {
            FileType::Directory => {}
            FileType::Symlink => return Err(Placement::Symlink),
            _ => return Err(Placement::Clash),
        },
        Err(errno) => return Err(errno.into()),
    }
    let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(parent, name, flags, Mode::empty()) {
        Ok(fd) => Ok(fd),
        // Swapped for a link since the check: the same refusal.
        Err(Errno::LOOP | Errno::NOTDIR) => Err(Placement::Symlink),
        Err(errno) => Err(errno.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{files, ROOMY};
    use super::super::Limits;
    use super::*;

    const NONE_YET: ArtifactUsage = ArtifactUsage { files: 0, bytes: 0 };

    fn scratch_is_empty(files: &JobFiles) -> bool {
        std::fs::read_dir(files.artifact_scratch())
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(true)
    }

    async fn upload(
        files: &JobFiles,
        relative: &str,
        body: &[u8],
        usage: ArtifactUsage,
    ) -> Result<StoredArtifact, JobFilesError> {
        let mut upload = files.start_artifact("j1", relative, None, usage).await?;
        upload.write(body).await?;
        let turn = files.artifact_turn("j1").await;
        upload.commit(&turn, usage).await
    }

    #[tokio::test]
    async fn a_committed_upload_is_in_place_with_its_size_and_hash() {
        let (_dir, files) = files(ROOMY);
        let mut upload = files
            .start_artifact("j1", "out/a.txt", None, NONE_YET)
            .await
            .unwrap();
        upload.write(b"hello ").await.unwrap();
        upload.write(b"world").await.unwrap();
        let turn = files.artifact_turn("j1").await;
        let stored = upload.commit(&turn, NONE_YET).await.unwrap();
        drop(turn);
        assert_eq!(stored.size, 11);
        assert_eq!(stored.sha256, hex::encode(Sha256::digest(b"hello world")));
        let path = files.artifact_path("j1", "out/a.txt").unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"hello world");
        assert!(scratch_is_empty(&files));
        assert_eq!(files.artifact_commits.len(), 0);
    }

    #[tokio::test]
    async fn a_reupload_replaces_the_artifact() {
        let (_dir, files) = files(ROOMY);
        upload(&files, "a", b"first", NONE_YET).await.unwrap();
        upload(&files, "a", b"second", NONE_YET).await.unwrap();
        let path = files.artifact_path("j1", "a").unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"second");
    }

    #[tokio::test]
    async fn an_escaping_path_is_refused_before_anything_is_written() {
        let (dir, files) = files(ROOMY);
        let err = files
            .start_artifact("j1", "../../etc/x", None, NONE_YET)
            .await
            .unwrap_err();
        assert!(matches!(err, JobFilesError::PathNotConfined(_)), "{err}");
        assert!(!dir.path().join("artifacts").exists());
    }

    #[tokio::test]
    async fn a_declared_size_over_the_cap_is_refused() {
        let (dir, files) = files(Limits {
            artifact_max_bytes: 4,
            ..ROOMY
        });
        assert!(files
            .start_artifact("j1", "a", Some(4), NONE_YET)
            .await
            .is_ok());
        let err = files
            .start_artifact("j1", "b", Some(5), NONE_YET)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                JobFilesError::OverQuota {
                    quota: Quota::ArtifactSize(4),
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("artifact `b`"), "{err}");
        assert!(
            !err.to_string().contains(&*dir.path().to_string_lossy()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn streaming_past_the_cap_fails_and_leaves_nothing() {
        let (_dir, files) = files(Limits {
            artifact_max_bytes: 4,
            ..ROOMY
        });
        let mut upload = files
            .start_artifact("j1", "a", None, NONE_YET)
            .await
            .unwrap();
        upload.write(b"abc").await.unwrap();
        let err = upload.write(b"de").await.unwrap_err();
        assert!(matches!(err, JobFilesError::OverQuota { .. }), "{err}");
        // Gone already, before the upload is even dropped.
        assert!(scratch_is_empty(&files));
        upload.abort().await;
        assert!(!files.artifact_path("j1", "a").unwrap().exists());
    }

    #[tokio::test]
    async fn the_job_total_caps_streaming_and_commit() {
        let (_dir, files) = files(Limits {
            artifact_max_bytes: 100,
            artifact_job_max_bytes: 10,
            ..ROOMY
        });
        let total = |err: &JobFilesError| {
            matches!(
                err,
                JobFilesError::OverQuota {
                    quota: Quota::ArtifactTotal(10),
                    ..
                }
            )
        };
        // 6 bytes used by the job's other artifacts: 4 left.
        let used = ArtifactUsage { files: 1, bytes: 6 };
        upload(&files, "a", b"abcd", used).await.unwrap();
        let err = upload(&files, "b", b"abcde", used).await.unwrap_err();
        assert!(total(&err), "{err}");
        // Started when there was room, committed after another upload took it.
        let mut late = files.start_artifact("j1", "c", None, used).await.unwrap();
        late.write(b"abc").await.unwrap();
        let turn = files.artifact_turn("j1").await;
        let err = late
            .commit(&turn, ArtifactUsage { files: 2, bytes: 9 })
            .await
            .unwrap_err();
        assert!(total(&err), "{err}");
        assert!(scratch_is_empty(&files));
        assert!(!files.artifact_path("j1", "c").unwrap().exists());
    }

    #[tokio::test]
    async fn the_file_count_is_checked_at_start_and_commit() {
        let (_dir, files) = files(Limits {
            artifact_max_files: 2,
            ..ROOMY
        });
        let count = |err: &JobFilesError| {
            matches!(
                err,
                JobFilesError::OverQuota {
                    quota: Quota::ArtifactFiles(2),
                    ..
                }
            )
        };
        let full = ArtifactUsage { files: 2, bytes: 2 };
        let err = files
            .start_artifact("j1", "c", None, full)
            .await
            .unwrap_err();
        assert!(count(&err), "{err}");
        let mut late = files
            .start_artifact("j1", "c", None, ArtifactUsage { files: 1, bytes: 1 })
            .await
            .unwrap();
        late.write(b"x").await.unwrap();
        let turn = files.artifact_turn("j1").await;
        let err = late.commit(&turn, full).await.unwrap_err();
        assert!(count(&err), "{err}");
        assert!(scratch_is_empty(&files));
    }

    #[tokio::test]
    async fn an_aborted_or_dropped_upload_leaves_nothing() {
        let (_dir, files) = files(ROOMY);
        let mut upload = files
            .start_artifact("j1", "a", None, NONE_YET)
            .await
            .unwrap();
        upload.write(b"partial").await.unwrap();
        upload.abort().await;
        assert!(!files.artifact_path("j1", "a").unwrap().exists());
        assert!(scratch_is_empty(&files));

        let mut upload = files
            .start_artifact("j1", "b", None, NONE_YET)
            .await
            .unwrap();
        for _ in 0..40 {
            upload.write(b"partial").await.unwrap();
        }
        assert!(!scratch_is_empty(&files));
        drop(upload);
        // The drop removes the scratch file on the blocking pool: wait for it, as long as a
        // loaded host needs (this is about whether it cleans up, not how fast).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !scratch_is_empty(&files) && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(scratch_is_empty(&files));
        assert!(!files.artifact_path("j1", "b").unwrap().exists());
    }

    /// A symlink planted in the job's folder (a guest cannot make one, but the host's tree may
    /// hold one) is never followed: not as a folder on the way, not as the artifact itself.
    #[tokio::test]
    async fn a_symlink_in_the_job_folder_is_not_followed() {
        let (dir, files) = files(ROOMY);
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("sentinel"), b"keep").unwrap();
        let job = files.artifacts_dir("j1");
        std::fs::create_dir_all(&job).unwrap();
        std::os::unix::fs::symlink(&outside, job.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("sentinel"), job.join("file")).unwrap();
        for relative in ["link/x", "link/sentinel", "file"] {
            let err = upload(&files, relative, b"evil", NONE_YET)
                .await
                .unwrap_err();
            assert!(
                matches!(&err, JobFilesError::PathNotConfined(p) if p == relative),
                "{relative}: {err}"
            );
        }
        assert_eq!(std::fs::read(outside.join("sentinel")).unwrap(), b"keep");
        let names: Vec<_> = std::fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["sentinel"]);
        assert!(scratch_is_empty(&files));

        // The job folder itself a symlink: refused too.
        let elsewhere = files.artifacts_dir("j2");
        std::os::unix::fs::symlink(&outside, &elsewhere).unwrap();
        let mut upload = files
            .start_artifact("j2", "y", None, NONE_YET)
            .await
            .unwrap();
        upload.write(b"evil").await.unwrap();
        let turn = files.artifact_turn("j2").await;
        let err = upload.commit(&turn, NONE_YET).await.unwrap_err();
        assert!(matches!(err, JobFilesError::PathNotConfined(_)), "{err}");
        assert!(!outside.join("y").exists());
    }

    #[tokio::test]
    async fn a_file_where_a_folder_goes_is_a_conflict() {
        let (_dir, files) = files(ROOMY);
        upload(&files, "a", b"file", NONE_YET).await.unwrap();
        let err = upload(&files, "a/b", b"x", NONE_YET).await.unwrap_err();
        assert!(matches!(err, JobFilesError::PathConflict(_)), "{err}");
        upload(&files, "d/e", b"x", NONE_YET).await.unwrap();
        let err = upload(&files, "d", b"x", NONE_YET).await.unwrap_err();
        assert!(matches!(err, JobFilesError::PathConflict(_)), "{err}");
        assert!(scratch_is_empty(&files));
    }
}
