//! The work the agent left in a checkout of a host repository, packed for the daemon: its commits
//! since the commit the checkout started at, plus one more commit holding whatever it left
//! uncommitted (untracked files included, ignored files not), as a git bundle of `HEAD` against
//! that start commit. The daemon stores the bundle as the artifact `RESULT_BUNDLE_ARTIFACT` and
//! turns it into a branch of the host repository on request.

use std::path::{Path, PathBuf};

use super::error::RunnerError;
use super::repo::Git;

/// The artifact path the result bundle is stored under; the runner never uploads a file of the
/// checkout under this name.
pub const RESULT_BUNDLE_ARTIFACT: &str = ".agentlab/result.bundle";
/// Who the commit of uncommitted changes is by: the runner made it, not the agent.
const COMMITTER_NAME: &str = "agentlab-runner";
const COMMITTER_EMAIL: &str = "agentlab-runner@localhost";

/// A bundle made of the checkout's changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultBundle {
    pub path: PathBuf,
    pub len: u64,
    /// Commits in it (the agent's, and the runner's commit of uncommitted changes if any).
    pub commits: u64,
    /// Whether the runner committed uncommitted changes to make it.
    pub committed_leftovers: bool,
}

impl Git<'_> {
    /// The commit the checkout is at, before the command runs.
    pub fn head_commit(&self, checkout: &Path) -> Result<String, RunnerError> {
        let out = self.run(Some(checkout), &["rev-parse", "--verify", "HEAD^{commit}"])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Commits what the command left uncommitted, then bundles `HEAD` against `base` into
    /// `bundle`. None when the checkout holds no change at all.
    pub fn bundle_changes(
        &self,
        checkout: &Path,
        base: &str,
        job_id: &str,
        bundle: &Path,
    ) -> Result<Option<ResultBundle>, RunnerError> {
        let status = self.run(
            Some(checkout),
            &["status", "--porcelain", "--untracked-files=all"],
        )?;
        let committed_leftovers = !status.stdout.is_empty();
        if committed_leftovers {
            self.run(Some(checkout), &["add", "--all"])?;
            let message = format!("Uncommitted changes left by job {job_id}");
            self.run(
                Some(checkout),
                &[
                    "-c",
                    &format!("user.name={COMMITTER_NAME}"),
                    "-c",
                    &format!("user.email={COMMITTER_EMAIL}"),
                    "commit",
                    "--quiet",
                    "--no-verify",
                    "--no-gpg-sign",
                    "-m",
                    &message,
                ],
            )?;
        }
        let range = format!("{base}..HEAD");
        let count = self.run(Some(checkout), &["rev-list", "--count", &range])?;
        let commits: u64 = String::from_utf8_lossy(&count.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        if commits == 0 {
            return Ok(None);
        }
        let target = bundle.to_str().ok_or_else(|| {
            RunnerError::io(
                format!("use {}", bundle.display()),
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "path is not UTF-8"),
            )
        })?;
        let not_base = format!("^{base}");
        self.run(
            Some(checkout),
            &["bundle", "create", "--quiet", target, "HEAD", &not_base],
        )?;
        let len = std::fs::metadata(bundle)
            .map_err(|e| RunnerError::io(format!("read {}", bundle.display()), e))?
            .len();
        Ok(Some(ResultBundle {
            path: bundle.to_path_buf(),
            len,
            commits,
            committed_leftovers,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::runner::mask::Masker;
    use crate::test_git::git;

    fn repo() -> (tempfile::TempDir, PathBuf, String) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("co");
        std::fs::create_dir(&dir).unwrap();
        git(&dir, &["init", "--quiet", "--initial-branch=main"]);
        std::fs::write(dir.join("a.txt"), "one\n").unwrap();
        std::fs::write(dir.join(".gitignore"), "*.tmp\n").unwrap();
        git(&dir, &["add", "."]);
        git(&dir, &["commit", "--quiet", "-m", "start"]);
        let base = git(&dir, &["rev-parse", "HEAD"]);
        (tmp, dir, base)
    }

    #[test]
    fn bundles_commits_and_leftovers_against_the_start_commit() {
        let (tmp, dir, base) = repo();
        let env = BTreeMap::new();
        let masker = Masker::new(Vec::<String>::new());
        let g = Git {
            env: &env,
            masker: &masker,
        };
        assert_eq!(g.head_commit(&dir).unwrap(), base);
        std::fs::write(dir.join("b.txt"), "committed\n").unwrap();
        git(&dir, &["add", "b.txt"]);
        git(&dir, &["commit", "--quiet", "-m", "agent's commit"]);
        std::fs::write(dir.join("a.txt"), "edited\n").unwrap();
        std::fs::write(dir.join("new.txt"), "untracked\n").unwrap();
        std::fs::write(dir.join("scratch.tmp"), "ignored\n").unwrap();

        let path = tmp.path().join("result.bundle");
        let bundle = g
            .bundle_changes(&dir, &base, "job-1", &path)
            .unwrap()
            .expect("changes were made");
        assert_eq!(bundle.commits, 2);
        assert!(bundle.committed_leftovers);
        assert_eq!(bundle.len, std::fs::metadata(&path).unwrap().len());

        // The bundle needs only the start commit, and carries both commits.
        let verify = git(&dir, &["bundle", "list-heads", path.to_str().unwrap()]);
        assert!(verify.ends_with(" HEAD"), "{verify}");
        let host = tmp.path().join("host");
        git(
            tmp.path(),
            &["clone", "--quiet", dir.to_str().unwrap(), "host"],
        );
        git(&host, &["reset", "--quiet", "--hard", &base]);
        git(
            &host,
            &[
                "fetch",
                "--quiet",
                path.to_str().unwrap(),
                "HEAD:refs/heads/r",
            ],
        );
        let files = git(&host, &["diff", "--name-only", &base, "r"]);
        assert_eq!(files, "a.txt\nb.txt\nnew.txt");
        let subject = git(&host, &["log", "-1", "--format=%s %an", "r"]);
        assert_eq!(
            subject,
            "Uncommitted changes left by job job-1 agentlab-runner"
        );
    }

    #[test]
    fn a_checkout_left_as_it_was_gives_no_bundle() {
        let (tmp, dir, base) = repo();
        std::fs::write(dir.join("scratch.tmp"), "ignored\n").unwrap();
        let env = BTreeMap::new();
        let masker = Masker::new(Vec::<String>::new());
        let g = Git {
            env: &env,
            masker: &masker,
        };
        let path = tmp.path().join("result.bundle");
        assert_eq!(g.bundle_changes(&dir, &base, "job-1", &path).unwrap(), None);
        assert!(!path.exists());
    }
}
