//! Getting the job's code into its workdir: a clone of the daemon's bundle, a clone of a URL, or
//! an empty directory. Nothing already in the workdir is ever removed: a non-empty workdir is an
//! error.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use super::error::RunnerError;
use super::exec::apply_env;
use super::mask::Masker;

/// How much of git's stderr an error quotes.
const GIT_ERROR_BYTES: usize = 2000;

/// Runs git with the job's env (so a job can configure authentication through `GIT_CONFIG_*`
/// or `GIT_ASKPASS`) and without ever prompting.
#[derive(Debug, Clone)]
pub struct Git<'a> {
    pub env: &'a BTreeMap<String, String>,
    pub masker: &'a Masker,
}

impl Git<'_> {
    pub(super) fn run(&self, dir: Option<&Path>, args: &[&str]) -> Result<Output, RunnerError> {
        let mut cmd = Command::new("git");
        apply_env(&mut cmd, self.env);
        cmd.env("GIT_TERMINAL_PROMPT", "0").args(args);
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        let shown = || {
            args.iter()
                .map(|a| redact_url(a))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let output = cmd.output().map_err(|e| RunnerError::Git {
            args: shown(),
            detail: format!("cannot run git: {e}"),
        })?;
        if output.status.success() {
            return Ok(output);
        }
        let stderr = self.masker.mask_all(&output.stderr);
        let stderr = String::from_utf8_lossy(&stderr);
        let stderr = stderr.trim();
        let cut = stderr
            .char_indices()
            .nth(GIT_ERROR_BYTES)
            .map_or(stderr.len(), |(i, _)| i);
        Err(RunnerError::Git {
            args: shown(),
            detail: format!("{}: {}", output.status, &stderr[..cut]),
        })
    }

    pub fn clone_bundle(
        &self,
        bundle: &Path,
        workdir: &Path,
        git_ref: Option<&str>,
    ) -> Result<(), RunnerError> {
        ensure_empty(workdir)?;
        let bundle = path_arg(bundle)?;
        let target = path_arg(workdir)?;
        match git_ref {
            Some(git_ref) => {
                // The bundle's HEAD may be missing or elsewhere: check out only what was asked.
                self.run(None, &["clone", "--quiet", "--no-checkout", bundle, target])?;
                self.checkout(workdir, git_ref)
            }
            None => self
                .run(None, &["clone", "--quiet", bundle, target])
                .map(drop),
        }
    }

    /// A shallow clone of `git_ref`; a ref `--branch` does not take (a commit id) falls back to
    /// a full clone and a checkout.
    pub fn clone_url(
        &self,
        url: &str,
        workdir: &Path,
        git_ref: Option<&str>,
    ) -> Result<(), RunnerError> {
        ensure_empty(workdir)?;
        let target = path_arg(workdir)?;
        let Some(git_ref) = git_ref else {
            return self
                .run(None, &["clone", "--quiet", "--depth", "1", url, target])
                .map(drop);
        };
        let shallow = self.run(
            None,
            &[
                "clone", "--quiet", "--depth", "1", "--branch", git_ref, url, target,
            ],
        );
        if shallow.is_ok() {
            return Ok(());
        }
        // The workdir was absent or empty before, so whatever is in it now is the failed clone's.
        if workdir.exists() {
            std::fs::remove_dir_all(workdir)
                .map_err(|e| RunnerError::io(format!("clean up {}", workdir.display()), e))?;
        }
        self.run(None, &["clone", "--quiet", url, target])?;
        self.checkout(workdir, git_ref)
    }

    fn checkout(&self, workdir: &Path, git_ref: &str) -> Result<(), RunnerError> {
        self.run(
            Some(workdir),
            &[
                "-c",
                "advice.detachedHead=false",
                "checkout",
                "--quiet",
                git_ref,
                "--",
            ],
        )
        .map(drop)
    }
}

/// An empty workdir, for a job without a repository.
pub fn create_empty(workdir: &Path) -> Result<(), RunnerError> {
    std::fs::create_dir_all(workdir)
        .map_err(|e| RunnerError::io(format!("create {}", workdir.display()), e))
}

fn ensure_empty(workdir: &Path) -> Result<(), RunnerError> {
    match std::fs::read_dir(workdir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(RunnerError::WorkdirNotEmpty(workdir.to_path_buf()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(RunnerError::io(format!("read {}", workdir.display()), e)),
    }
    if let Some(parent) = workdir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| RunnerError::io(format!("create {}", parent.display()), e))?;
    }
    Ok(())
}

fn path_arg(path: &Path) -> Result<&str, RunnerError> {
    path.to_str().ok_or_else(|| {
        RunnerError::io(
            format!("use {}", path.display()),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "path is not UTF-8"),
        )
    })
}

pub use crate::secrets::url::{redact_url, url_secrets};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_git::git;

    /// A repo with two commits on `main`; returns the first commit's id.
    fn make_repo(dir: &Path) -> String {
        git(dir, &["init", "--quiet", "--initial-branch=main"]);
        std::fs::write(dir.join("a.txt"), "one").unwrap();
        git(dir, &["add", "a.txt"]);
        git(dir, &["commit", "--quiet", "-m", "one"]);
        let first = git(dir, &["rev-parse", "HEAD"]);
        std::fs::write(dir.join("a.txt"), "two").unwrap();
        git(dir, &["commit", "--quiet", "-am", "two"]);
        first
    }

    fn no_env() -> (BTreeMap<String, String>, Masker) {
        (BTreeMap::new(), Masker::new(Vec::<String>::new()))
    }

    #[test]
    fn clones_a_bundle_at_a_ref() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let first = make_repo(&src);
        let bundle = tmp.path().join("repo.bundle");
        git(
            &src,
            &[
                "bundle",
                "create",
                "--quiet",
                bundle.to_str().unwrap(),
                "--all",
            ],
        );
        let (env, masker) = no_env();
        let g = Git {
            env: &env,
            masker: &masker,
        };

        let head = tmp.path().join("head");
        g.clone_bundle(&bundle, &head, None).unwrap();
        assert_eq!(std::fs::read_to_string(head.join("a.txt")).unwrap(), "two");

        let at_first = tmp.path().join("first");
        g.clone_bundle(&bundle, &at_first, Some(&first)).unwrap();
        assert_eq!(
            std::fs::read_to_string(at_first.join("a.txt")).unwrap(),
            "one"
        );

        let at_main = tmp.path().join("main");
        g.clone_bundle(&bundle, &at_main, Some("main")).unwrap();
        assert_eq!(
            git(&at_main, &["rev-parse", "--abbrev-ref", "HEAD"]),
            "main"
        );
    }

    #[test]
    fn clones_a_url_shallow_by_branch_and_in_full_for_a_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let first = make_repo(&src);
        let url = format!("file://{}", src.display());
        let (env, masker) = no_env();
        let g = Git {
            env: &env,
            masker: &masker,
        };

        let by_branch = tmp.path().join("branch");
        g.clone_url(&url, &by_branch, Some("main")).unwrap();
        assert_eq!(git(&by_branch, &["rev-list", "--count", "HEAD"]), "1");

        let by_commit = tmp.path().join("commit");
        g.clone_url(&url, &by_commit, Some(&first)).unwrap();
        assert_eq!(
            std::fs::read_to_string(by_commit.join("a.txt")).unwrap(),
            "one"
        );

        let missing = tmp.path().join("missing");
        let err = g
            .clone_url(&url, &missing, Some("no-such-ref"))
            .unwrap_err();
        assert!(matches!(err, RunnerError::Git { .. }), "{err}");
    }

    #[test]
    fn refuses_a_non_empty_workdir_and_leaves_it_alone() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("keep.txt"), "mine").unwrap();
        let (env, masker) = no_env();
        let g = Git {
            env: &env,
            masker: &masker,
        };
        let err = g
            .clone_url("file:///nonexistent", tmp.path(), Some("main"))
            .unwrap_err();
        assert!(matches!(err, RunnerError::WorkdirNotEmpty(_)), "{err}");
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("keep.txt")).unwrap(),
            "mine"
        );
    }
}
