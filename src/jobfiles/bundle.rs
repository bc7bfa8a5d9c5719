//! The git bundle of a job's host repository, so the guest can clone it without network access.
//! It is made once per job, on the guest's first request, and served from `bundles/JOB/` on every
//! later one; requests that arrive while it is being made wait for that one (single flight), and a
//! bundle that cannot be made stays that job's answer too, so no guest can make the host run git in
//! a loop. The job's lifecycle removes the folder when the job ends (retention as a backstop).
//!
//! The bundle carries the job's ref only (a branch, a tag or a commit; HEAD's branch when none),
//! and a HEAD for the clone: never the repository's other branches, stash or notes. It is made in
//! a scratch bare repository of the daemon's own that borrows the host repository's objects (as a
//! git alternate) and holds just those refs, after `crate::host_repos` has checked the repository
//! against `repo_roots` again (it may have been swapped since the job was submitted).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{spawn_blocking, JobFiles, JobFilesError};
use crate::host_repos::{self, BundleTarget, HostRepoError, ResolvedRepo};

const BUNDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Cap on each small git step in the scratch repository.
pub(super) const STEP_TIMEOUT: Duration = Duration::from_secs(60);
const BUNDLE_FILE: &str = "repo.bundle";
/// Holds the answer for a job whose bundle could not be made: `refused` or `failed`, a newline,
/// and the message the guest gets.
const FAILURE_FILE: &str = "failed";
/// What the guest is told when the host failed; the daemon's log has the details.
const HOST_FAILURE: &str = "the job's repository could not be bundled; the daemon's log says why";

/// A bundle ready to stream.
#[derive(Debug)]
pub struct RepoBundle {
    pub file: std::fs::File,
    pub size: u64,
    /// Whether this request made it (the others are served the file the first one made).
    pub made_now: bool,
}

/// Where a job's bundle comes from: its `repo` and `ref`, and the roots it must lie under.
#[derive(Debug, Clone)]
pub struct BundleSource {
    pub repo: PathBuf,
    pub git_ref: Option<String>,
    pub repo_roots: Vec<PathBuf>,
}

impl JobFiles {
    /// The folder holding the job's bundle (or the answer for one that could not be made).
    pub fn bundle_dir(&self, job_id: &str) -> PathBuf {
        self.bundles.join(job_id)
    }

    /// The job's bundle: the one already made, or made now (once, however many ask at a time:
    /// makings of one job's bundle take turns, like its log appends).
    pub async fn repo_bundle(
        &self,
        job_id: &str,
        source: BundleSource,
    ) -> Result<RepoBundle, JobFilesError> {
        if let Some(bundle) = self.open_bundle(job_id).await? {
            return Ok(bundle);
        }
        // Made in a task of its own: a guest that hangs up cannot cancel it halfway and so
        // let the next request start a second one.
        let (files, job) = (self.clone(), job_id.to_owned());
        let made = tokio::spawn(async move {
            let _turn = files.bundle_makings.lock(&job).await;
            files.make_bundle_once(&job, source).await
        })
        .await
        .map_err(|e| JobFilesError::TaskFailed(e.to_string()))??;
        let mut bundle = self.open_bundle(job_id).await?.ok_or_else(|| {
            JobFilesError::BundleUnavailable("the bundle was removed: the job has ended".into())
        })?;
        bundle.made_now = made;
        Ok(bundle)
    }

    /// Makes the job's bundle unless a request before this one did (or found it cannot be made);
    /// true if this call made it. Callers hold the job's turn.
    async fn make_bundle_once(
        &self,
        job_id: &str,
        source: BundleSource,
    ) -> Result<bool, JobFilesError> {
        if self.open_bundle(job_id).await?.is_some() {
            return Ok(false);
        }
        let (files, job) = (self.clone(), job_id.to_owned());
        spawn_blocking(move || files.make_bundle(&job, &source)).await??;
        Ok(true)
    }

    /// The bundle already made for the job, the answer kept for one that could not be, or None.
    async fn open_bundle(&self, job_id: &str) -> Result<Option<RepoBundle>, JobFilesError> {
        let dir = self.bundle_dir(job_id);
        match tokio::fs::read_to_string(dir.join(FAILURE_FILE)).await {
            Ok(kept) => return Err(kept_failure(&kept)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(JobFilesError::io(format!("reading {}", dir.display()))(e)),
        }
        let path = dir.join(BUNDLE_FILE);
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(JobFilesError::io(format!("opening {}", path.display()))(e)),
        };
        let size = file
            .metadata()
            .await
            .map_err(JobFilesError::io(format!("reading {}", path.display())))?
            .len();
        Ok(Some(RepoBundle {
            file: file.into_std().await,
            size,
            made_now: false,
        }))
    }

    /// Removes the job's bundle folder (the job has ended); nothing to remove is fine.
    pub async fn remove_bundle(&self, job_id: &str) -> Result<(), JobFilesError> {
        let dir = self.bundle_dir(job_id);
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(JobFilesError::io(format!("removing {}", dir.display()))(e))
            }
            _ => Ok(()),
        }
    }

    /// Makes the job's bundle into `bundles/JOB/`, or keeps there why it could not be made.
    fn make_bundle(&self, job_id: &str, source: &BundleSource) -> Result<(), JobFilesError> {
        let result = host_repos::inspect(
            &source.repo,
            &source.repo_roots,
            source.git_ref.as_deref(),
            host_repos::RESOLVE_TIMEOUT,
        )
        .map_err(JobFilesError::from)
        .and_then(|resolved| {
            let dir = self.bundle_dir(job_id);
            std::fs::create_dir_all(&dir)
                .map_err(JobFilesError::io(format!("creating {}", dir.display())))?;
            create_bundle(
                &resolved,
                &self.scratch,
                &dir.join(BUNDLE_FILE),
                BUNDLE_TIMEOUT,
            )
            .map(|size| (resolved, size))
        });
        let err = match result {
            Ok((resolved, size)) => {
                tracing::info!(
                    job = job_id,
                    commit = resolved.target.commit(),
                    bytes = size,
                    "made the repository bundle"
                );
                return Ok(());
            }
            Err(err) => err,
        };
        let (kind, message) = match &err {
            JobFilesError::Repo(repo_err) if repo_err.is_refusal() => {
                ("refused", format!("the job's repository: {repo_err}"))
            }
            _ => ("failed", HOST_FAILURE.to_owned()),
        };
        tracing::warn!(job = job_id, %err, "the repository bundle could not be made");
        let dir = self.bundle_dir(job_id);
        let kept = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join(FAILURE_FILE), format!("{kind}\n{message}")));
        if let Err(e) = kept {
            tracing::warn!(job = job_id, err = %e, "could not keep the bundle's failure");
        }
        Err(kept_failure(&format!("{kind}\n{message}")))
    }
}

/// The error a kept failure stands for.
fn kept_failure(kept: &str) -> JobFilesError {
    match kept.split_once('\n') {
        Some(("refused", message)) => JobFilesError::BundleRefused(message.to_owned()),
        Some((_, message)) => JobFilesError::BundleUnavailable(message.to_owned()),
        None => JobFilesError::BundleUnavailable(HOST_FAILURE.to_owned()),
    }
}

/// A bare repository of the daemon's own under `tmp/` that borrows a host repository's objects
/// (as a git alternate); removed when dropped, however its work went.
pub(super) struct ScratchRepo(PathBuf);

impl ScratchRepo {
    /// A new, empty scratch repository under `scratch` with `resolved`'s objects as its alternate.
    pub(super) fn borrowing(
        scratch: &Path,
        resolved: &ResolvedRepo,
    ) -> Result<ScratchRepo, JobFilesError> {
        std::fs::create_dir_all(scratch)
            .map_err(JobFilesError::io(format!("creating {}", scratch.display())))?;
        let repo = ScratchRepo(scratch.join(format!("{}.git", crate::model::new_id())));
        let git_dir = repo.0.as_path();
        step(
            duct::cmd!(
                "git",
                "init",
                "--bare",
                "--quiet",
                "--template=",
                format!("--object-format={}", resolved.object_format),
                git_dir
            )
            .stdout_null(),
            STEP_TIMEOUT,
        )?;
        let alternates = git_dir.join("objects/info/alternates");
        std::fs::create_dir_all(git_dir.join("objects/info"))
            .and_then(|()| {
                let mut line = resolved.objects.clone().into_os_string();
                line.push("\n");
                std::fs::write(&alternates, line.as_encoded_bytes())
            })
            .map_err(JobFilesError::io(format!(
                "writing {}",
                alternates.display()
            )))?;
        Ok(repo)
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchRepo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `git --git-dir=SCRATCH ARGS`: the daemon's own repository, so no `safe.directory` entry.
pub(super) fn scratch_git(scratch: &Path, args: &[&str]) -> duct::Expression {
    let mut argv = vec![std::ffi::OsString::from("--git-dir")];
    argv.push(scratch.into());
    argv.extend(args.iter().map(std::ffi::OsString::from));
    duct::cmd("git", argv)
        .env_remove("GIT_DIR")
        .env_remove("GIT_OBJECT_DIRECTORY")
        .env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES")
}

fn step(expression: duct::Expression, timeout: Duration) -> Result<(), JobFilesError> {
    let output = host_repos::run_git(expression, "bundle", timeout).map_err(|e| match e {
        HostRepoError::Timeout { seconds, .. } => JobFilesError::BundleTimeout { seconds },
        other => JobFilesError::BundleFailed {
            stderr: other.to_string(),
        },
    })?;
    if output.status.success() {
        return Ok(());
    }
    Err(JobFilesError::BundleFailed {
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

/// The refs `git bundle create` is given, and that the scratch repository holds.
fn bundle_refs(target: &BundleTarget) -> Vec<&str> {
    match target {
        BundleTarget::Branch { full_name, .. } | BundleTarget::Tag { full_name, .. } => {
            vec!["HEAD", full_name]
        }
        BundleTarget::Commit { .. } => vec!["HEAD"],
    }
}

/// Writes the bundle of `resolved`'s target through a scratch repository under `scratch`, and
/// moves it to `dest` once complete; returns its size. Nothing is left in `scratch`.
fn create_bundle(
    resolved: &ResolvedRepo,
    scratch: &Path,
    dest: &Path,
    timeout: Duration,
) -> Result<u64, JobFilesError> {
    let repo = ScratchRepo::borrowing(scratch, resolved)?;
    let git_dir = repo.0.as_path();
    let commit = resolved.target.commit();
    match &resolved.target {
        BundleTarget::Branch { full_name, commit } => {
            step(
                scratch_git(git_dir, &["update-ref", full_name, commit]),
                STEP_TIMEOUT,
            )?;
            step(
                scratch_git(git_dir, &["symbolic-ref", "HEAD", full_name]),
                STEP_TIMEOUT,
            )?;
        }
        BundleTarget::Tag { full_name, tag, .. } => {
            step(
                scratch_git(git_dir, &["update-ref", full_name, tag]),
                STEP_TIMEOUT,
            )?;
            step(
                scratch_git(git_dir, &["update-ref", "--no-deref", "HEAD", commit]),
                STEP_TIMEOUT,
            )?;
        }
        BundleTarget::Commit { commit } => step(
            scratch_git(git_dir, &["update-ref", "--no-deref", "HEAD", commit]),
            STEP_TIMEOUT,
        )?,
    }
    // Inside the scratch repository, so a bundle (or git's lock file) cut short goes with it.
    let bundle = git_dir.join(BUNDLE_FILE);
    let bundle_arg = bundle.to_str().ok_or_else(|| JobFilesError::BundleFailed {
        stderr: format!("{} is not UTF-8", bundle.display()),
    })?;
    let mut args = vec!["bundle", "create", "--quiet", bundle_arg];
    args.extend(bundle_refs(&resolved.target));
    step(scratch_git(git_dir, &args), timeout)?;
    let size = std::fs::metadata(&bundle)
        .map_err(JobFilesError::io(format!("reading {}", bundle.display())))?
        .len();
    std::fs::rename(&bundle, dest).map_err(JobFilesError::io(format!(
        "moving the bundle to {}",
        dest.display()
    )))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Read;

    use super::super::tests::{files, ROOMY};
    use super::*;
    use crate::runner::mask::Masker;
    use crate::runner::repo::Git;
    use crate::test_git::git;

    /// A repository at `repo`: two commits on main (a tag on the first), a branch `other` with a
    /// secret of its own, a stash and a note.
    fn busy_repo(repo: &Path) {
        std::fs::create_dir_all(repo).unwrap();
        git(repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join("README"), "one").unwrap();
        git(repo, &["add", "README"]);
        git(repo, &["commit", "-q", "-m", "first"]);
        git(repo, &["tag", "v1"]);
        std::fs::write(repo.join("README"), "two").unwrap();
        git(repo, &["commit", "-q", "-am", "second"]);
        git(repo, &["checkout", "-q", "-b", "other"]);
        std::fs::write(repo.join("secret.txt"), "other branch").unwrap();
        git(repo, &["add", "secret.txt"]);
        git(repo, &["commit", "-q", "-m", "other"]);
        git(repo, &["checkout", "-q", "main"]);
        std::fs::write(repo.join("README"), "stashed").unwrap();
        git(repo, &["stash", "-q"]);
        git(repo, &["notes", "add", "-m", "a note", "HEAD"]);
    }

    fn source(repo: &Path, root: &Path, git_ref: Option<&str>) -> BundleSource {
        BundleSource {
            repo: repo.to_owned(),
            git_ref: git_ref.map(str::to_owned),
            repo_roots: vec![root.to_owned()],
        }
    }

    /// The bundle's bytes, written to `dir/NAME.bundle`.
    fn save(dir: &Path, name: &str, mut bundle: RepoBundle) -> (PathBuf, Vec<u8>) {
        let mut bytes = Vec::new();
        bundle.file.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, bundle.size);
        let path = dir.join(format!("{name}.bundle"));
        std::fs::write(&path, &bytes).unwrap();
        (path, bytes)
    }

    /// `git bundle list-heads`: the ref names only.
    fn heads(bundle: &Path) -> Vec<String> {
        let listed = git(
            bundle.parent().unwrap(),
            &["bundle", "list-heads", bundle.to_str().unwrap()],
        );
        listed
            .lines()
            .map(|l| l.split_whitespace().nth(1).unwrap().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_bundle_carries_the_requested_ref_only_and_the_runner_checks_it_out() {
        let (dir, files) = files(ROOMY);
        let root = dir.path().join("root");
        let repo = root.join("repo");
        busy_repo(&repo);
        let first = git(&repo, &["rev-parse", "v1"]);
        let (env, masker) = (BTreeMap::new(), Masker::new(Vec::<String>::new()));
        let runner = Git {
            env: &env,
            masker: &masker,
        };
        let cases = [
            ("head", None, vec!["HEAD", "refs/heads/main"], "two"),
            ("main", Some("main"), vec!["HEAD", "refs/heads/main"], "two"),
            ("tag", Some("v1"), vec!["HEAD", "refs/tags/v1"], "one"),
            ("commit", Some(&first[..12]), vec!["HEAD"], "one"),
        ];
        for (job, git_ref, expected, readme) in cases {
            let bundle = files
                .repo_bundle(job, source(&repo, &root, git_ref))
                .await
                .unwrap();
            assert!(bundle.made_now);
            let (path, _) = save(dir.path(), job, bundle);
            assert_eq!(heads(&path), expected, "{job}");

            let checkout = dir.path().join(format!("checkout-{job}"));
            runner.clone_bundle(&path, &checkout, git_ref).unwrap();
            let readme_now = std::fs::read_to_string(checkout.join("README")).unwrap();
            assert_eq!(readme_now, readme, "{job}");
            assert!(!checkout.join("secret.txt").exists(), "{job}");
            let refs = git(&checkout, &["for-each-ref", "--format=%(refname)"]);
            for absent in ["other", "stash", "notes"] {
                assert!(!refs.contains(absent), "{job}: {refs}");
            }
            let everything = git(&checkout, &["log", "--all", "--format=%s"]);
            assert!(!everything.contains("other"), "{job}: {everything}");
        }
        let leftovers = std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
        assert_eq!(leftovers, 0, "no scratch repository or bundle is left");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bundle_is_made_once_per_job_and_served_from_its_file() {
        let (dir, files) = files(ROOMY);
        let root = dir.path().join("root");
        let repo = root.join("repo");
        busy_repo(&repo);
        let requests = (0..8).map(|_| {
            let (files, source) = (files.clone(), source(&repo, &root, None));
            tokio::spawn(async move { files.repo_bundle("j1", source).await })
        });
        let mut made = 0;
        let mut contents = Vec::new();
        for (i, request) in requests.collect::<Vec<_>>().into_iter().enumerate() {
            let bundle = request.await.unwrap().unwrap();
            made += usize::from(bundle.made_now);
            contents.push(save(dir.path(), &format!("b{i}"), bundle).1);
        }
        assert_eq!(made, 1, "one request made it");
        assert!(contents.windows(2).all(|w| w[0] == w[1]));

        // The repository moves on; the job keeps the bundle it got.
        std::fs::write(repo.join("README"), "three").unwrap();
        git(&repo, &["commit", "-q", "-am", "third"]);
        let later = files
            .repo_bundle("j1", source(&repo, &root, None))
            .await
            .unwrap();
        assert!(!later.made_now);
        assert_eq!(save(dir.path(), "later", later).1, contents[0]);
        assert_eq!(files.bundle_makings.len(), 0, "no making is left");

        files.remove_bundle("j1").await.unwrap();
        assert!(!files.bundle_dir("j1").exists());
        files.remove_bundle("j1").await.unwrap();
    }

    #[tokio::test]
    async fn a_refusal_is_the_jobs_answer_without_running_git_again() {
        let (dir, files) = files(ROOMY);
        let root = dir.path().join("root");
        let repo = root.join("repo");
        busy_repo(&repo);
        let err = files
            .repo_bundle("j1", source(&repo, &root, Some("no-such-ref")))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, JobFilesError::BundleRefused(m) if m.contains("no-such-ref")),
            "{err}"
        );
        assert!(!err.to_string().contains(dir.path().to_str().unwrap()));
        // Even once the ref exists, the job keeps the answer it got.
        git(&repo, &["branch", "no-such-ref"]);
        let again = files
            .repo_bundle("j1", source(&repo, &root, Some("no-such-ref")))
            .await
            .unwrap_err();
        assert_eq!(again.to_string(), err.to_string());
        assert_eq!(files.bundle_makings.len(), 0, "no making is left");
    }

    #[tokio::test]
    async fn a_repo_swapped_for_a_symlink_to_outside_the_roots_is_refused_at_bundle_time() {
        let (dir, files) = files(ROOMY);
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let outside = dir.path().join("outside");
        busy_repo(&outside);
        std::os::unix::fs::symlink(&outside, root.join("repo")).unwrap();
        let err = files
            .repo_bundle("j1", source(&root.join("repo"), &root, None))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, JobFilesError::BundleRefused(m) if m.contains("repo_roots")),
            "{err}"
        );
        assert!(!files.bundle_dir("j1").join(BUNDLE_FILE).exists());
    }

    #[test]
    fn a_bundle_that_takes_too_long_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        busy_repo(&repo);
        let resolved = host_repos::inspect(
            &repo,
            &[dir.path().to_owned()],
            None,
            host_repos::RESOLVE_TIMEOUT,
        )
        .unwrap();
        let scratch = dir.path().join("tmp");
        let dest = dir.path().join("b.bundle");
        let err = create_bundle(&resolved, &scratch, &dest, Duration::ZERO).unwrap_err();
        assert!(matches!(err, JobFilesError::BundleTimeout { .. }), "{err}");
        assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
        assert!(!dest.exists());
    }
}
