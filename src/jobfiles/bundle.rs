//! Git bundles of a job's host repository, so the guest can clone it without network access.

use std::path::Path;
use std::time::Duration;

use super::{spawn_blocking, JobFiles, JobFilesError};

const BUNDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// A bundle ready to stream: the file is already unlinked, so it disappears once closed.
#[derive(Debug)]
pub struct RepoBundle {
    pub file: std::fs::File,
    pub size: u64,
}

impl JobFiles {
    /// Bundles every ref of the repository at `repo` (a path on this host) for the job.
    pub async fn bundle_repo(&self, job_id: &str, repo: &str) -> Result<RepoBundle, JobFilesError> {
        let scratch = self.scratch.clone();
        let bundle = scratch.join(format!("{job_id}-{}.bundle", crate::model::new_id()));
        let repo = repo.to_owned();
        spawn_blocking(move || create_bundle(&repo, &scratch, &bundle, BUNDLE_TIMEOUT)).await?
    }
}

/// Runs `git bundle create` under a timeout and returns the open bundle, already unlinked.
fn create_bundle(
    repo: &str,
    scratch: &Path,
    bundle: &Path,
    timeout: Duration,
) -> Result<RepoBundle, JobFilesError> {
    std::fs::create_dir_all(scratch)
        .map_err(JobFilesError::io(format!("creating {}", scratch.display())))?;
    let handle = duct::cmd!(
        "git",
        "-c",
        "safe.directory=*",
        "-C",
        repo,
        "bundle",
        "create",
        bundle,
        "--all"
    )
    .stdout_null()
    .stderr_capture()
    .unchecked()
    .start()
    .map_err(JobFilesError::io("starting git bundle"))?;
    let output = match handle
        .wait_timeout(timeout)
        .map_err(JobFilesError::io("waiting for git bundle"))?
    {
        Some(output) => output.clone(),
        None => {
            let _ = handle.kill();
            let _ = std::fs::remove_file(bundle);
            return Err(JobFilesError::BundleTimeout {
                repo: repo.to_owned(),
                seconds: timeout.as_secs(),
            });
        }
    };
    if !output.status.success() {
        let _ = std::fs::remove_file(bundle);
        return Err(JobFilesError::BundleFailed {
            repo: repo.to_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let opened = JobFilesError::io(format!("opening {}", bundle.display()));
    let file = std::fs::File::open(bundle).map_err(opened)?;
    std::fs::remove_file(bundle)
        .map_err(JobFilesError::io(format!("removing {}", bundle.display())))?;
    let size = file
        .metadata()
        .map_err(JobFilesError::io(format!("reading {}", bundle.display())))?
        .len();
    Ok(RepoBundle { file, size })
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::super::tests::{files, ROOMY};
    use super::*;

    fn git(dir: &Path, args: &[&str]) {
        let status = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t"])
            .args(args)
            .current_dir(dir)
            .status()
            .unwrap();
        assert!(status.success(), "git {args:?}");
    }

    /// A repository at `repo` with one commit.
    fn one_commit_repo(repo: &Path) {
        std::fs::create_dir_all(repo).unwrap();
        git(repo, &["init", "-q"]);
        std::fs::write(repo.join("README"), "hi").unwrap();
        git(repo, &["add", "README"]);
        git(repo, &["commit", "-q", "-m", "first"]);
    }

    #[tokio::test]
    async fn bundles_a_repository_and_leaves_no_scratch_file() {
        let (dir, files) = files(ROOMY);
        let repo = dir.path().join("repo");
        one_commit_repo(&repo);

        let mut bundle = files
            .bundle_repo("j1", repo.to_str().unwrap())
            .await
            .unwrap();
        let mut content = Vec::new();
        bundle.file.read_to_end(&mut content).unwrap();
        assert_eq!(content.len() as u64, bundle.size);
        assert!(content.starts_with(b"# v2 git bundle"), "not a bundle");
        let leftovers = std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
        assert_eq!(leftovers, 0, "the bundle file is unlinked");
    }

    #[tokio::test]
    async fn a_folder_that_is_no_repository_fails_with_gits_message() {
        let (dir, files) = files(ROOMY);
        let not_repo = dir.path().join("plain");
        std::fs::create_dir_all(&not_repo).unwrap();
        let err = files
            .bundle_repo("j1", not_repo.to_str().unwrap())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, JobFilesError::BundleFailed { stderr, .. } if !stderr.is_empty()),
            "{err}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_bundle_that_takes_too_long_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        one_commit_repo(&repo);
        let scratch = dir.path().join("tmp");
        let err = create_bundle(
            repo.to_str().unwrap(),
            &scratch,
            &scratch.join("b.bundle"),
            Duration::ZERO,
        )
        .unwrap_err();
        assert!(matches!(err, JobFilesError::BundleTimeout { .. }), "{err}");
        assert!(!scratch.join("b.bundle").exists());
    }
}
