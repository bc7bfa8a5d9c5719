//! A job's files on the host: its log, its artifacts, and the git bundle of its repository that
//! the guest clones. This module owns where they live under `data_dir`, the caps on their sizes,
//! the confinement of guest-given paths, and the file IO itself, always off the async executor
//! (`tokio::fs` or `spawn_blocking`). HTTP handlers call it; they never touch these files.
//!
//! Layout (the folders come from the config, the per-job names from here):
//! - `logs/JOB.log`: the job's stdout/stderr, appended by the guest with the job's secrets masked
//!   (`mask`), capped at `log_max_bytes`;
//! - `artifacts/JOB/PATH`: each uploaded artifact, capped at `artifact_max_bytes` each and, for
//!   the job, at `artifact_job_max_bytes` and `artifact_max_files` in all; written to
//!   `artifacts/.tmp/` first and renamed into place once complete, never through a symlink;
//! - `bundles/JOB/`: the git bundle of the job's host repository, made once on the guest's first
//!   request and removed when the job ends (or why it could not be made);
//! - `artifacts/JOB/.agentlab/result.bundle`: the work the agent left in a host repository's
//!   checkout, which `changes` reads and turns into the job's branch;
//! - `tmp/`: scratch for making bundles (a bare repository per bundle, removed once done).
//!
//! Appends to one job's log, commits of one job's artifacts, and makings of its bundle take turns (a per-job lock held
//! by this `JobFiles` and its clones), so the caps hold however many requests a guest sends at
//! once: the daemon keeps one `JobFiles` for the guest API.

mod artifacts;
mod bundle;
mod changes;
mod locks;
mod logs;
mod mask;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::paths::join_confined;

pub use artifacts::{ArtifactUpload, StoredArtifact};
pub use bundle::{BundleSource, RepoBundle};
pub use changes::{ResultTarget, RESULT_BRANCH_PREFIX, RESULT_BUNDLE_ARTIFACT};
pub use logs::{LogAppend, LogReader};
pub use mask::{JobMasker, LogMasks};

/// A per-job cap a guest reached. The request that meets it is refused (413) and the job goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// `artifact_max_bytes`: one artifact.
    ArtifactSize(u64),
    /// `artifact_job_max_bytes`: all of a job's artifacts together.
    ArtifactTotal(u64),
    /// `artifact_max_files`: how many artifacts a job may store.
    ArtifactFiles(u64),
    /// `log_max_bytes`: the job's stored output.
    Log(u64),
}

impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Quota::ArtifactSize(n) => {
                write!(f, "the {n}-byte limit on one artifact (artifact_max_bytes)")
            }
            Quota::ArtifactTotal(n) => {
                write!(
                    f,
                    "the {n}-byte limit on a job's artifacts in all (artifact_job_max_bytes)"
                )
            }
            Quota::ArtifactFiles(n) => {
                write!(f, "the limit of {n} artifacts per job (artifact_max_files)")
            }
            Quota::Log(n) => write!(f, "the {n}-byte limit on a job's log (log_max_bytes)"),
        }
    }
}

impl Quota {
    /// The job's event saying the quota was reached: the same text every time, so that the
    /// store records it once per job however often the guest runs into it.
    pub fn event_message(&self) -> String {
        match self {
            Quota::Log(_) => format!("the log reached {self}; later output is refused"),
            _ => format!("an artifact upload was refused: it would go past {self}"),
        }
    }
}

/// What can go wrong with a job's files. `PathNotConfined`, `PathConflict`, `OverQuota` and
/// `Incomplete` are the caller's fault; the others are the host's.
#[derive(Debug, thiserror::Error)]
pub enum JobFilesError {
    #[error("artifact path `{0}` must be relative, without `..`, and not through a symlink")]
    PathNotConfined(String),
    #[error("artifact path `{0}` clashes with another artifact (a file where a folder is, or the reverse)")]
    PathConflict(String),
    #[error("{what} would go past {quota}")]
    OverQuota { what: String, quota: Quota },
    #[error("upload of `{0}` ended before it was complete")]
    Incomplete(String),
    #[error("git bundle timed out after {seconds} s")]
    BundleTimeout { seconds: u64 },
    #[error("git bundle failed: {stderr}")]
    BundleFailed { stderr: String },
    #[error(transparent)]
    Repo(#[from] crate::host_repos::HostRepoError),
    /// The job's bundle cannot be made from what it asked for (kept as its answer); the message
    /// names no host path.
    #[error("{0}")]
    BundleRefused(String),
    /// The host could not make the job's bundle (kept as its answer); the message names no host
    /// path, the daemon's log has the details.
    #[error("{0}")]
    BundleUnavailable(String),
    /// The guest's result bundle is not one the daemon takes; the message names no host path.
    #[error("the result bundle is refused: {0}")]
    ResultRefused(String),
    /// Git could not read the result bundle or make the job's branch; `detail` may quote git.
    #[error("git {what} failed: {detail}")]
    ResultFailed { what: &'static str, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a file task stopped before finishing: {0}")]
    TaskFailed(String),
}

impl JobFilesError {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> JobFilesError {
        let context = context.into();
        move |source| JobFilesError::Io { context, source }
    }
}

/// The size caps the daemon's config sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Cap on one artifact.
    pub artifact_max_bytes: u64,
    /// Cap on all of a job's artifacts together.
    pub artifact_job_max_bytes: u64,
    /// How many artifacts a job may store.
    pub artifact_max_files: u64,
    /// Cap on a job's stored log; past it the log ends with a truncation notice.
    pub log_max_bytes: u64,
}

/// Where a daemon's job files live and how large they may grow. Cheap to build (paths and two
/// empty lock maps); clones share the locks.
#[derive(Debug, Clone)]
pub struct JobFiles {
    logs: PathBuf,
    artifacts: PathBuf,
    bundles: PathBuf,
    scratch: PathBuf,
    limits: Limits,
    log_appends: Arc<locks::JobLocks>,
    artifact_commits: Arc<locks::JobLocks>,
    bundle_makings: Arc<locks::JobLocks>,
}

impl JobFiles {
    pub fn new(config: &Config) -> JobFiles {
        JobFiles {
            logs: config.logs_dir(),
            artifacts: config.artifacts_dir(),
            bundles: config.data_dir.join("bundles"),
            scratch: config.data_dir.join("tmp"),
            limits: Limits {
                artifact_max_bytes: config.artifact_max_bytes,
                artifact_job_max_bytes: config.artifact_job_max_bytes,
                artifact_max_files: config.artifact_max_files,
                log_max_bytes: config.log_max_bytes,
            },
            log_appends: Arc::default(),
            artifact_commits: Arc::default(),
            bundle_makings: Arc::default(),
        }
    }

    /// The same layout under `data_dir`, with explicit limits (tests, tools).
    pub fn under(data_dir: &Path, limits: Limits) -> JobFiles {
        JobFiles {
            logs: data_dir.join("logs"),
            artifacts: data_dir.join("artifacts"),
            bundles: data_dir.join("bundles"),
            scratch: data_dir.join("tmp"),
            limits,
            log_appends: Arc::default(),
            artifact_commits: Arc::default(),
            bundle_makings: Arc::default(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn log_path(&self, job_id: &str) -> PathBuf {
        self.logs.join(format!("{job_id}.log"))
    }

    /// The folder holding the job's artifacts.
    pub fn artifacts_dir(&self, job_id: &str) -> PathBuf {
        self.artifacts.join(job_id)
    }

    /// Where the artifact `relative` of the job lives, if the path stays inside the job's folder.
    pub fn artifact_path(&self, job_id: &str, relative: &str) -> Result<PathBuf, JobFilesError> {
        join_confined(&self.artifacts_dir(job_id), relative)
            .ok_or_else(|| JobFilesError::PathNotConfined(relative.to_owned()))
    }

    /// Opens a stored artifact for reading.
    pub async fn open_artifact(
        &self,
        job_id: &str,
        relative: &str,
    ) -> Result<tokio::fs::File, JobFilesError> {
        let path = self.artifact_path(job_id, relative)?;
        tokio::fs::File::open(&path)
            .await
            .map_err(JobFilesError::io(format!("opening {}", path.display())))
    }

    /// Scratch folder for artifacts being uploaded: on the same file system as their destination,
    /// so the final rename is atomic.
    fn artifact_scratch(&self) -> PathBuf {
        self.artifacts.join(".tmp")
    }

    /// Removes what uploads and bundle makings cut short by a crash left in the scratch folders.
    /// Only before the guest API serves: nothing may be in flight. Both are made again on demand.
    pub async fn sweep_scratch(&self) -> Result<(), JobFilesError> {
        for dir in [self.scratch.clone(), self.artifact_scratch()] {
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(JobFilesError::io(format!("clearing {}", dir.display()))(
                        err,
                    ))
                }
            }
        }
        Ok(())
    }
}

/// Runs blocking file work on tokio's blocking pool.
async fn spawn_blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, JobFilesError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| JobFilesError::TaskFailed(e.to_string()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn files(limits: Limits) -> (tempfile::TempDir, JobFiles) {
        let dir = tempfile::tempdir().unwrap();
        let files = JobFiles::under(dir.path(), limits);
        (dir, files)
    }

    pub(crate) const ROOMY: Limits = Limits {
        artifact_max_bytes: 1 << 20,
        artifact_job_max_bytes: 1 << 30,
        artifact_max_files: 1000,
        log_max_bytes: 1 << 20,
    };

    #[test]
    fn layout_follows_the_config() {
        let config = Config {
            data_dir: PathBuf::from("/srv/agentlab"),
            artifact_max_bytes: 7,
            artifact_job_max_bytes: 8,
            artifact_max_files: 3,
            log_max_bytes: 9,
            ..Config::default()
        };
        let files = JobFiles::new(&config);
        assert_eq!(
            files.log_path("j1"),
            PathBuf::from("/srv/agentlab/logs/j1.log")
        );
        assert_eq!(
            files.artifact_path("j1", "out/a.txt").unwrap(),
            PathBuf::from("/srv/agentlab/artifacts/j1/out/a.txt")
        );
        assert_eq!(
            files.limits(),
            Limits {
                artifact_max_bytes: 7,
                artifact_job_max_bytes: 8,
                artifact_max_files: 3,
                log_max_bytes: 9
            }
        );
    }

    #[tokio::test]
    async fn the_sweep_clears_both_scratch_folders_and_nothing_else() {
        let (dir, files) = files(ROOMY);
        let leftover_bundle = dir.path().join("tmp/0123.git/objects");
        let leftover_upload = files.artifact_scratch().join("0456");
        std::fs::create_dir_all(&leftover_bundle).unwrap();
        std::fs::create_dir_all(files.artifact_scratch()).unwrap();
        std::fs::write(&leftover_upload, b"half").unwrap();
        let kept = files.artifact_path("j1", "out/a.txt").unwrap();
        std::fs::create_dir_all(kept.parent().unwrap()).unwrap();
        std::fs::write(&kept, b"kept").unwrap();
        files.append_log("j1", b"log\n").await.unwrap();

        files.sweep_scratch().await.unwrap();
        assert!(!dir.path().join("tmp").exists());
        assert!(!files.artifact_scratch().exists());
        assert_eq!(std::fs::read(&kept).unwrap(), b"kept");
        assert_eq!(files.read_log("j1", 0).await.unwrap(), b"log\n");
        files.sweep_scratch().await.unwrap();
    }

    #[test]
    fn artifact_paths_cannot_leave_the_job_folder() {
        let (_dir, files) = files(ROOMY);
        for bad in ["../j2/a", "/etc/passwd", "a/../../x", ""] {
            let err = files.artifact_path("j1", bad).unwrap_err();
            assert!(
                matches!(&err, JobFilesError::PathNotConfined(p) if p == bad),
                "{bad:?}: {err}"
            );
        }
    }

    /// Retention queues a job's files for removal by their paths under `data_dir`: they must be
    /// the files this module writes.
    #[test]
    fn retention_removes_the_files_written_here() {
        let data = Path::new("/srv/agentlab");
        let files = JobFiles::under(data, ROOMY);
        assert_eq!(
            files.log_path("j1"),
            data.join(crate::store::job_log_path("j1"))
        );
        assert_eq!(
            files.artifacts_dir("j1"),
            data.join(crate::store::job_artifacts_path("j1"))
        );
        assert_eq!(
            files.bundle_dir("j1"),
            data.join(crate::store::job_bundle_path("j1"))
        );
    }
}
