//! The agent's changes on the host: the result bundle a guest uploaded (the artifact
//! `RESULT_BUNDLE_ARTIFACT`: its commits against the commit its checkout started at), what it
//! changed (commits, files, lines), the job's branch `agentlab/JOB` made from it in the host
//! repository on request, and the change as a patch series for `agentlab job diff`.
//!
//! The bundle is the guest's, so it is checked before git reads it: one ref, `HEAD`, and at most
//! one prerequisite. Git reads it with `fetch.fsckObjects` into a scratch repository of the
//! daemon's that borrows the host repository's objects, so counting and diffing write nothing
//! into the host repository. Making the branch is the one write: a fetch of `HEAD` into
//! `refs/heads/agentlab/JOB` only (no tags, no FETCH_HEAD, no gc), run as the user who owns
//! the repository, so its new objects belong to that user and not to the daemon.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::bundle::{scratch_git, ScratchRepo, STEP_TIMEOUT};
use super::{spawn_blocking, JobFiles, JobFilesError};
use crate::host_repos::{self, HostRepoError, ResolvedRepo};
use crate::model::JobChanges;
pub use crate::runner::changes::RESULT_BUNDLE_ARTIFACT;

/// The job's branch in its host repository is `agentlab/JOB`.
pub const RESULT_BRANCH_PREFIX: &str = "agentlab/";
/// Cap on a bundle's header (its refs and prerequisites); git's own are a few hundred bytes.
const HEADER_MAX: usize = 64 * 1024;
/// Cap on reading the bundle into a repository (a 10 MB change takes well under a second).
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);
/// The ref the scratch repository keeps the result under.
const SCRATCH_REF: &str = "refs/agentlab/result";

/// Where the job's result comes from and goes: its host repository, and the roots it must lie
/// under (checked again: the repository may have been swapped since the job was submitted).
#[derive(Debug, Clone)]
pub struct ResultTarget {
    pub repo: PathBuf,
    pub repo_roots: Vec<PathBuf>,
}

/// What a result bundle's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BundleHeader {
    /// The commit the changes start from; none when the bundle holds a whole history.
    base: Option<String>,
    tip: String,
}

/// The result read into a scratch repository.
struct OpenResult {
    scratch: ScratchRepo,
    host: ResolvedRepo,
    header: BundleHeader,
    bundle: PathBuf,
}

impl JobFiles {
    /// Where the job's result bundle is stored (an artifact like the others).
    pub fn result_bundle_path(&self, job_id: &str) -> Result<PathBuf, JobFilesError> {
        self.artifact_path(job_id, RESULT_BUNDLE_ARTIFACT)
    }

    /// What the job's result bundle changes and, with `make_branch` and at least one commit,
    /// the branch `agentlab/JOB` made of it in the host repository; None when the guest sent no
    /// result. The bundle is read once for both. A branch that cannot be made leaves the counts
    /// and says why in `error`; a bundle that cannot be read is the error.
    pub async fn take_changes(
        &self,
        job_id: &str,
        target: ResultTarget,
        make_branch: bool,
    ) -> Result<Option<JobChanges>, JobFilesError> {
        self.with_result(job_id, target, move |open, job| {
            let mut changes = count_changes(open)?;
            if make_branch && changes.commits > 0 {
                let branch = format!("{RESULT_BRANCH_PREFIX}{job}");
                match fetch_into_host(open, job, &branch) {
                    Ok(()) => changes.branch = Some(branch),
                    Err(err) => changes.error = Some(format!("the branch was not made: {err}")),
                }
            }
            Ok(changes)
        })
        .await
    }

    /// The job's change as a patch series (`git format-patch --stdout`); None when the guest
    /// sent no result.
    pub async fn result_patch(
        &self,
        job_id: &str,
        target: ResultTarget,
    ) -> Result<Option<Vec<u8>>, JobFilesError> {
        self.with_result(job_id, target, |open, _| {
            let range = match &open.header.base {
                Some(base) => vec![format!("{base}..{SCRATCH_REF}")],
                None => vec!["--root".to_owned(), SCRATCH_REF.to_owned()],
            };
            let mut args = vec!["format-patch", "--stdout", "--no-signature", "--binary"];
            args.extend(range.iter().map(String::as_str));
            let output = git_output(
                scratch_git(open.scratch.path(), &args),
                "format-patch",
                FETCH_TIMEOUT,
            )?;
            Ok(output)
        })
        .await
    }

    /// Runs `work` on the job's result bundle read into a scratch repository, off the async
    /// executor; None when the guest sent no result.
    async fn with_result<T: Send + 'static>(
        &self,
        job_id: &str,
        target: ResultTarget,
        work: impl FnOnce(&OpenResult, &str) -> Result<T, JobFilesError> + Send + 'static,
    ) -> Result<Option<T>, JobFilesError> {
        let (files, job) = (self.clone(), job_id.to_owned());
        spawn_blocking(move || match files.open_result(&job, &target)? {
            Some(open) => work(&open, &job).map(Some),
            None => Ok(None),
        })
        .await?
    }

    /// The job's result bundle read into a fresh scratch repository; None when there is none.
    fn open_result(
        &self,
        job_id: &str,
        target: &ResultTarget,
    ) -> Result<Option<OpenResult>, JobFilesError> {
        let bundle = self.result_bundle_path(job_id)?;
        let header = match std::fs::File::open(&bundle) {
            Ok(file) => read_header(file)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(JobFilesError::io(format!("opening {}", bundle.display()))(
                    e,
                ))
            }
        };
        let host = host_repos::inspect(
            &target.repo,
            &target.repo_roots,
            None,
            host_repos::RESOLVE_TIMEOUT,
        )?;
        let scratch = ScratchRepo::borrowing(&self.scratch, &host)?;
        let bundle_arg = utf8(&bundle)?;
        let refspec = format!("HEAD:{SCRATCH_REF}");
        git_output(
            scratch_git(
                scratch.path(),
                &[
                    "-c",
                    "fetch.fsckObjects=true",
                    "fetch",
                    "--quiet",
                    "--no-tags",
                    "--no-write-fetch-head",
                    bundle_arg,
                    &refspec,
                ],
            ),
            "fetch (result bundle)",
            FETCH_TIMEOUT,
        )?;
        Ok(Some(OpenResult {
            scratch,
            host,
            header,
            bundle,
        }))
    }
}

/// Parses and checks the header of a guest's result bundle: `# v2 git bundle` (or v3 with its
/// capabilities), at most one prerequisite, and exactly one ref, `HEAD`.
fn read_header(file: std::fs::File) -> Result<BundleHeader, JobFilesError> {
    use std::io::Read;
    let mut head = Vec::with_capacity(4096);
    file.take(HEADER_MAX as u64)
        .read_to_end(&mut head)
        .map_err(JobFilesError::io("reading the result bundle"))?;
    let refused = |why: &str| JobFilesError::ResultRefused(why.to_owned());
    let end = head
        .windows(2)
        .position(|w| w == b"\n\n")
        .ok_or_else(|| refused("its header does not end within 64 KiB"))?;
    let text = std::str::from_utf8(&head[..end]).map_err(|_| refused("its header is not UTF-8"))?;
    let mut lines = text.lines();
    match lines.next() {
        Some("# v2 git bundle" | "# v3 git bundle") => {}
        _ => return Err(refused("it is not a git bundle")),
    }
    let mut prerequisites = Vec::new();
    let mut refs = Vec::new();
    for line in lines {
        if line.starts_with('@') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('-') {
            let oid = rest.split(' ').next().unwrap_or_default();
            prerequisites
                .push(check_oid(oid).ok_or_else(|| refused("a prerequisite is not an object id"))?);
        } else {
            let (oid, name) = line
                .split_once(' ')
                .ok_or_else(|| refused("a ref line has no name"))?;
            let oid = check_oid(oid).ok_or_else(|| refused("a ref is not an object id"))?;
            refs.push((oid, name.to_owned()));
        }
    }
    if prerequisites.len() > 1 {
        return Err(refused(
            "it needs more than one commit of the repository; only changes on top of one start commit are taken",
        ));
    }
    let [(tip, name)] = refs.as_slice() else {
        return Err(refused("it must carry exactly one ref, HEAD"));
    };
    if name != "HEAD" {
        return Err(refused("it must carry exactly one ref, HEAD"));
    }
    Ok(BundleHeader {
        base: prerequisites.pop(),
        tip: tip.clone(),
    })
}

/// `oid` if it is a full SHA-1 or SHA-256 object id in lower-case hex.
fn check_oid(oid: &str) -> Option<String> {
    let hex = oid
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (hex && (oid.len() == 40 || oid.len() == 64)).then(|| oid.to_owned())
}

fn utf8(path: &Path) -> Result<&str, JobFilesError> {
    path.to_str().ok_or_else(|| JobFilesError::ResultFailed {
        what: "path",
        detail: format!("{} is not UTF-8", path.display()),
    })
}

/// Stdout of a git run that must succeed.
fn git_output(
    expression: duct::Expression,
    what: &'static str,
    timeout: Duration,
) -> Result<Vec<u8>, JobFilesError> {
    let output = host_repos::run_git(expression, what, timeout).map_err(|e| match e {
        HostRepoError::Timeout { seconds, .. } => JobFilesError::ResultFailed {
            what,
            detail: format!("timed out after {seconds} s"),
        },
        other => JobFilesError::ResultFailed {
            what,
            detail: other.to_string(),
        },
    })?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    Err(JobFilesError::ResultFailed {
        what,
        detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

/// Commits, files and lines the result changes against its start commit.
fn count_changes(open: &OpenResult) -> Result<JobChanges, JobFilesError> {
    let scratch = open.scratch.path();
    let (commits, base) = match &open.header.base {
        Some(base) => {
            let not_base = format!("^{base}");
            let count = git_output(
                scratch_git(scratch, &["rev-list", "--count", SCRATCH_REF, &not_base]),
                "rev-list",
                STEP_TIMEOUT,
            )?;
            (count, base.clone())
        }
        None => {
            let count = git_output(
                scratch_git(scratch, &["rev-list", "--count", SCRATCH_REF]),
                "rev-list",
                STEP_TIMEOUT,
            )?;
            let empty_tree = git_output(
                scratch_git(scratch, &["mktree"]).stdin_bytes(Vec::new()),
                "mktree",
                STEP_TIMEOUT,
            )?;
            (
                count,
                String::from_utf8_lossy(&empty_tree).trim().to_owned(),
            )
        }
    };
    let commits = String::from_utf8_lossy(&commits)
        .trim()
        .parse()
        .map_err(|_| JobFilesError::ResultFailed {
            what: "rev-list",
            detail: "unexpected answer".into(),
        })?;
    let numstat = git_output(
        scratch_git(scratch, &["diff", "--numstat", "-z", &base, SCRATCH_REF]),
        "diff",
        FETCH_TIMEOUT,
    )?;
    let mut changes = JobChanges {
        commits,
        ..JobChanges::default()
    };
    for entry in parse_numstat(&numstat) {
        changes.files += 1;
        changes.insertions += entry.0;
        changes.deletions += entry.1;
    }
    Ok(changes)
}

/// (insertions, deletions) per file of `git diff --numstat -z`; a binary file counts 0 and 0. A
/// rename's record has two more NUL-terminated paths after an empty one.
fn parse_numstat(out: &[u8]) -> Vec<(u64, u64)> {
    let mut entries = Vec::new();
    let mut fields = out.split(|b| *b == 0).peekable();
    while let Some(record) = fields.next() {
        if record.is_empty() {
            continue;
        }
        let text = String::from_utf8_lossy(record);
        let mut parts = text.splitn(3, '\t');
        let (Some(added), Some(deleted), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if path.is_empty() {
            // A rename: the old and the new path follow.
            fields.next();
            fields.next();
        }
        entries.push((added.parse().unwrap_or(0), deleted.parse().unwrap_or(0)));
    }
    entries
}

/// Removes a file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Fetches the result's `HEAD` into the host repository as `refs/heads/BRANCH`, as the user that
/// owns the repository. Nothing else in it changes: no other ref, no FETCH_HEAD, no work tree.
fn fetch_into_host(open: &OpenResult, job_id: &str, branch: &str) -> Result<(), JobFilesError> {
    let host = &open.host;
    let full_name = format!("refs/heads/{branch}");
    if !host_repos::is_valid_ref_name(&full_name) {
        return Err(JobFilesError::ResultFailed {
            what: "branch name",
            detail: format!("`{full_name}` is not a valid ref name"),
        });
    }
    let owner = std::fs::metadata(&host.objects).map_err(JobFilesError::io(format!(
        "reading {}",
        host.objects.display()
    )))?;
    let common_dir = host.objects.parent().unwrap_or(&host.objects).to_owned();
    let as_owner = nix::unistd::geteuid().is_root() && owner.uid() != 0;
    // The owner may not be able to read the daemon's files: it is given its own copy, in its
    // own repository's folder, for the time of the fetch.
    let copy = if as_owner {
        let copy = TempFile(common_dir.join(format!("agentlab-result-{job_id}.bundle")));
        std::fs::copy(&open.bundle, &copy.0)
            .and_then(|_| std::os::unix::fs::chown(&copy.0, Some(owner.uid()), Some(owner.gid())))
            .map_err(JobFilesError::io(format!(
                "copying the bundle to {}",
                copy.0.display()
            )))?;
        Some(copy)
    } else {
        None
    };
    let bundle = copy
        .as_ref()
        .map_or(open.bundle.as_path(), |c| c.0.as_path());
    let refspec = format!("{}:{full_name}", open.header.tip);
    let mut expression = host_repos::host_git(
        &host.path,
        &[
            "-c",
            "fetch.fsckObjects=true",
            "-c",
            "gc.auto=0",
            "-c",
            "maintenance.auto=false",
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--no-recurse-submodules",
            utf8(bundle)?,
            &refspec,
        ],
    )
    // The daemon's own git config is not the owner's to read.
    .env("GIT_CONFIG_GLOBAL", "/dev/null")
    .env("HOME", OsString::from(common_dir.as_os_str()));
    if as_owner {
        let (uid, gid) = (owner.uid(), owner.gid());
        expression = expression.before_spawn(move |command| {
            command.uid(uid).gid(gid);
            Ok(())
        });
    }
    git_output(expression, "fetch (result branch)", FETCH_TIMEOUT).map(drop)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::super::tests::ROOMY;
    use super::*;
    use crate::test_git::git;

    /// A host repository under `root` with one commit on main and a branch `other`; returns the
    /// repository and its main commit.
    fn host_repo(root: &Path) -> (PathBuf, String) {
        let repo = root.join("app");
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join("a.txt"), "one\n").unwrap();
        git(&repo, &["add", "a.txt"]);
        git(&repo, &["commit", "-q", "-m", "start"]);
        git(&repo, &["branch", "other"]);
        let base = git(&repo, &["rev-parse", "HEAD"]);
        (repo, base)
    }

    /// What a runner would send: a clone of `repo` that edits a.txt in one commit and adds b.txt
    /// in another, bundled as `HEAD ^base`, stored as the job's result bundle.
    fn store_result(files: &JobFiles, job: &str, work: &Path, repo: &Path, base: &str) {
        let guest = work.join(format!("guest-{job}"));
        git(
            work,
            &[
                "clone",
                "-q",
                repo.to_str().unwrap(),
                guest.to_str().unwrap(),
            ],
        );
        std::fs::write(guest.join("a.txt"), "one\ntwo\n").unwrap();
        git(&guest, &["commit", "-q", "-am", "edit a"]);
        std::fs::write(guest.join("b.txt"), "new\n").unwrap();
        git(&guest, &["add", "b.txt"]);
        git(&guest, &["commit", "-q", "-m", "add b"]);
        let dest = files.result_bundle_path(job).unwrap();
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        git(
            &guest,
            &[
                "bundle",
                "create",
                "-q",
                dest.to_str().unwrap(),
                "HEAD",
                &format!("^{base}"),
            ],
        );
    }

    fn refs_and_status(repo: &Path) -> (String, String) {
        (
            git(repo, &["for-each-ref", "--format=%(refname) %(objectname)"]),
            git(repo, &["status", "--porcelain", "--untracked-files=all"]),
        )
    }

    #[tokio::test]
    async fn counts_the_change_makes_only_its_branch_and_prints_the_patch() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("repos");
        let (repo, base) = host_repo(&root);
        std::fs::write(repo.join("local.txt"), "the user's own work\n").unwrap();
        let files = JobFiles::under(&tmp.path().join("data"), ROOMY);
        store_result(&files, "j1", tmp.path(), &repo, &base);
        let target = ResultTarget {
            repo: repo.clone(),
            repo_roots: vec![root.clone()],
        };
        let (refs_before, status_before) = refs_and_status(&repo);

        let changes = files
            .take_changes("j1", target.clone(), false)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            changes,
            JobChanges {
                commits: 2,
                files: 2,
                insertions: 2,
                deletions: 0,
                branch: None,
                error: None
            }
        );
        // Reading the change wrote nothing into the host repository.
        assert_eq!(
            refs_and_status(&repo),
            (refs_before.clone(), status_before.clone())
        );

        let branch = files
            .take_changes("j1", target.clone(), true)
            .await
            .unwrap()
            .and_then(|changes| changes.branch);
        assert_eq!(branch.as_deref(), Some("agentlab/j1"));
        let (refs_after, status_after) = refs_and_status(&repo);
        assert_eq!(status_after, status_before, "the work tree is untouched");
        let added: Vec<&str> = refs_after
            .lines()
            .filter(|l| !refs_before.lines().any(|b| b == *l))
            .collect();
        assert_eq!(added.len(), 1, "{refs_after}");
        assert!(added[0].starts_with("refs/heads/agentlab/j1 "), "{added:?}");
        assert!(refs_before.lines().all(|l| refs_after.contains(l)));
        assert_eq!(
            git(&repo, &["log", "--format=%s", "main..agentlab/j1"]),
            "add b\nedit a"
        );
        assert!(!repo.join(".git/FETCH_HEAD").exists());

        let patch = files.result_patch("j1", target).await.unwrap().unwrap();
        let patch = String::from_utf8(patch).unwrap();
        assert!(patch.contains("Subject: [PATCH 1/2] edit a"), "{patch}");
        assert!(patch.contains("+new"), "{patch}");
    }

    #[tokio::test]
    async fn no_bundle_means_no_change() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("repos");
        let (repo, _) = host_repo(&root);
        let files = JobFiles::under(&tmp.path().join("data"), ROOMY);
        let target = ResultTarget {
            repo,
            repo_roots: vec![root],
        };
        assert_eq!(
            files
                .take_changes("j1", target.clone(), false)
                .await
                .unwrap(),
            None
        );
        assert_eq!(files.take_changes("j1", target, true).await.unwrap(), None);
    }

    #[tokio::test]
    async fn refuses_a_bundle_with_other_refs_and_one_whose_base_the_host_lacks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("repos");
        let (repo, base) = host_repo(&root);
        let files = JobFiles::under(&tmp.path().join("data"), ROOMY);
        let target = ResultTarget {
            repo: repo.clone(),
            repo_roots: vec![root.clone()],
        };
        // A guest that sends every branch it has, not just HEAD.
        let guest = tmp.path().join("guest");
        git(
            tmp.path(),
            &["clone", "-q", repo.to_str().unwrap(), "guest"],
        );
        git(&guest, &["branch", "extra"]);
        let dest = files.result_bundle_path("j1").unwrap();
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        git(
            &guest,
            &["bundle", "create", "-q", dest.to_str().unwrap(), "--all"],
        );
        let err = files
            .take_changes("j1", target.clone(), true)
            .await
            .unwrap_err();
        assert!(matches!(err, JobFilesError::ResultRefused(_)), "{err}");
        std::fs::write(&dest, b"PK\x03\x04 not a bundle\n\n").unwrap();
        let err = files
            .take_changes("j1", target.clone(), false)
            .await
            .unwrap_err();
        assert!(matches!(err, JobFilesError::ResultRefused(_)), "{err}");

        // Changes on top of a commit the host repository never had.
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        git(&elsewhere, &["init", "-q", "-b", "main"]);
        for n in ["1", "2"] {
            std::fs::write(elsewhere.join("x"), n).unwrap();
            git(&elsewhere, &["add", "x"]);
            git(&elsewhere, &["commit", "-q", "-m", n]);
        }
        git(
            &elsewhere,
            &[
                "bundle",
                "create",
                "-q",
                dest.to_str().unwrap(),
                "HEAD",
                "^HEAD~1",
            ],
        );
        let refs_before = refs_and_status(&repo);
        let err = files.take_changes("j1", target, true).await.unwrap_err();
        assert!(matches!(err, JobFilesError::ResultFailed { .. }), "{err}");
        assert_eq!(refs_and_status(&repo), refs_before);
        assert!(git(&repo, &["rev-parse", "HEAD"]) == base);
    }

    #[tokio::test]
    async fn the_branch_is_fetched_as_the_repository_owner() {
        if !nix::unistd::geteuid().is_root() {
            // Only root can fetch as another user; as anyone else the fetch runs as the daemon.
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = tmp.path().join("repos");
        let (repo, base) = host_repo(&root);
        let files = JobFiles::under(&tmp.path().join("data"), ROOMY);
        store_result(&files, "j2", tmp.path(), &repo, &base);
        let nobody = 65534;
        duct::cmd!("chown", "-R", format!("{nobody}:{nobody}"), &root)
            .run()
            .unwrap();
        let target = ResultTarget {
            repo: repo.clone(),
            repo_roots: vec![root],
        };
        let branch = files
            .take_changes("j2", target, true)
            .await
            .unwrap()
            .unwrap()
            .branch;
        assert_eq!(branch.as_deref(), Some("agentlab/j2"));
        let mut pending = vec![repo.join(".git")];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let entry = entry.unwrap();
                let meta = entry.metadata().unwrap();
                assert_eq!(
                    meta.uid(),
                    nobody,
                    "{} belongs to root",
                    entry.path().display()
                );
                if meta.is_dir() {
                    pending.push(entry.path());
                }
            }
        }
        assert!(!repo.join(".git/agentlab-result-j2.bundle").exists());
    }

    #[test]
    fn reads_numstat_with_renames_and_binaries() {
        let out = b"1\t2\ta.txt\0-\t-\tbin.png\0" as &[u8];
        let rename = b"3\t0\t\0old.txt\0new.txt\0";
        let all = [out, rename].concat();
        assert_eq!(parse_numstat(&all), vec![(1, 2), (0, 0), (3, 0)]);
    }
}
