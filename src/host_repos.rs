//! Repositories on the daemon's host that a job names as its `repo`. The daemon runs as root, so a
//! job may only use a repository that lies under one of the config's `repo_roots`, with both the
//! roots and the repository resolved to canonical paths (symlinks followed) and the repository's
//! object store (with its alternates and the symlinks in it) inside the roots too. Git runs in such
//! a repository with `safe.directory` widened to that one folder only. This module also owns the
//! ref names a job may ask for and their resolution to what its bundle carries: one branch, tag
//! or commit. Everything here touches the disk or runs git: call it off the async executor.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

/// The longest ref name a job may give.
const MAX_REF_BYTES: usize = 255;
/// How deep git follows alternates of alternates (its own limit).
const MAX_ALTERNATE_DEPTH: usize = 5;
/// Cap on one `git rev-parse` in a host repository (a hung file system must not hang a request).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Environment that would point git elsewhere than the repository it is run in.
const GIT_LOCATION_ENV: [&str; 7] = [
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_COMMON_DIR",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_NAMESPACE",
];

/// Why a host repository cannot be used. The messages name no host path (the guest may see
/// them); the submit handler adds the repo the user gave.
#[derive(Debug, thiserror::Error)]
pub enum HostRepoError {
    #[error(
        "`repo_roots` (the daemon's config) is empty, so no repository on this host may be used"
    )]
    NoRoots,
    #[error("it is not under one of `repo_roots` (the daemon's config), or does not exist")]
    OutsideRoots,
    #[error("it is not a git repository")]
    NotARepository,
    #[error(
        "its object store (or an alternate of it, or a symlink in it) leads outside `repo_roots`"
    )]
    ObjectsOutsideRoots,
    #[error("ref `{0}` is not a valid ref name")]
    InvalidRef(String),
    #[error("ref `{0}` names no branch, tag or commit in it")]
    RefNotFound(String),
    #[error("ref `{git_ref}` is `{full_name}`: only a branch, a tag or a commit id can be cloned")]
    RefNotCloneable { git_ref: String, full_name: String },
    /// The host's fault; `detail` may quote git and host paths: for the daemon's log only.
    #[error("git {what} failed: {detail}")]
    Git { what: &'static str, detail: String },
    #[error("git {what} timed out after {seconds} s")]
    Timeout { what: &'static str, seconds: u64 },
}

impl HostRepoError {
    /// True when the job asked for something it may not have (as opposed to a host fault).
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            HostRepoError::Git { .. } | HostRepoError::Timeout { .. }
        )
    }
}

/// True for a name `git check-ref-format --allow-onelevel` accepts that does not start with `-`
/// (a commit id, full or abbreviated, is one): no `..`, `@{`, `//`, control characters, space,
/// `~ ^ : ? * [ \`, no component starting with `.` or ending with `.lock`, no leading or trailing
/// `/`, no trailing `.`, not `@` alone.
pub fn is_valid_ref_name(name: &str) -> bool {
    if name.is_empty() || name.len() > MAX_REF_BYTES || name == "@" || name.starts_with('-') {
        return false;
    }
    if name.starts_with('/') || name.ends_with('/') || name.ends_with('.') {
        return false;
    }
    if ["..", "@{", "//"].iter().any(|bad| name.contains(bad)) {
        return false;
    }
    if name
        .chars()
        .any(|c| c.is_control() || " ~^:?*[\\".contains(c))
    {
        return false;
    }
    name.split('/')
        .all(|part| !part.starts_with('.') && !part.ends_with(".lock"))
}

/// True if `path` (canonical) is one of `roots` (canonical) or lies under one.
fn under_any(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|root| path.starts_with(root))
}

/// The roots as they are now on disk; a root that vanished covers nothing.
fn canonical_roots(roots: &[PathBuf]) -> Vec<PathBuf> {
    roots
        .iter()
        .filter_map(|root| std::fs::canonicalize(root).ok())
        .collect()
}

/// The canonical path of `repo` if it lies under one of `roots`. A path that does not exist gets
/// the same answer as one outside the roots: the answer must not tell what exists on the host.
pub fn confine(repo: &Path, roots: &[PathBuf]) -> Result<PathBuf, HostRepoError> {
    if roots.is_empty() {
        return Err(HostRepoError::NoRoots);
    }
    if !repo.is_absolute() {
        return Err(HostRepoError::OutsideRoots);
    }
    let canonical = std::fs::canonicalize(repo).map_err(|_| HostRepoError::OutsideRoots)?;
    if !under_any(&canonical, &canonical_roots(roots)) {
        return Err(HostRepoError::OutsideRoots);
    }
    Ok(canonical)
}

/// What a job's bundle carries, resolved in its host repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleTarget {
    /// `refs/heads/NAME` at `commit`; the bundle's HEAD points at it.
    Branch { full_name: String, commit: String },
    /// `refs/tags/NAME`, whose object is `tag` (a tag object or the commit itself); the bundle's
    /// HEAD is `commit`, detached.
    Tag {
        full_name: String,
        tag: String,
        commit: String,
    },
    /// A commit named by its id; the bundle holds a detached HEAD only.
    Commit { commit: String },
}

impl BundleTarget {
    /// The commit the guest checks out.
    pub fn commit(&self) -> &str {
        match self {
            BundleTarget::Branch { commit, .. }
            | BundleTarget::Tag { commit, .. }
            | BundleTarget::Commit { commit } => commit,
        }
    }
}

/// A host repository checked against the roots, with the ref the job asked for resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRepo {
    /// The repository's canonical path (its work tree, or the repository itself when bare).
    pub path: PathBuf,
    /// Its object store, canonical, under the roots (with its alternates).
    pub objects: PathBuf,
    /// `sha1` or `sha256`.
    pub object_format: String,
    pub target: BundleTarget,
}

/// `git` run in the host repository at `repo` (canonical, inside the roots): `safe.directory`
/// covers that one folder (never `*`), discovery cannot climb above it, and no environment
/// variable points git at another repository.
pub fn host_git(repo: &Path, args: &[&str]) -> duct::Expression {
    let mut safe_directory = OsString::from("safe.directory=");
    safe_directory.push(repo.as_os_str());
    let mut argv: Vec<OsString> = vec!["-c".into(), safe_directory, "-C".into(), repo.into()];
    argv.extend(args.iter().map(OsString::from));
    let ceiling = repo.parent().unwrap_or(repo);
    let mut expression = duct::cmd("git", argv)
        .env("GIT_CEILING_DIRECTORIES", ceiling)
        .env("GIT_TERMINAL_PROMPT", "0");
    for name in GIT_LOCATION_ENV {
        expression = expression.env_remove(name);
    }
    expression
}

/// Runs `expression` (stdout captured) under `timeout`; a non-zero exit is returned, not an error.
pub fn run_git(
    expression: duct::Expression,
    what: &'static str,
    timeout: Duration,
) -> Result<Output, HostRepoError> {
    let handle = expression
        .stdout_capture()
        .stderr_capture()
        .unchecked()
        .start()
        .map_err(|e| HostRepoError::Git {
            what,
            detail: format!("cannot start git: {e}"),
        })?;
    match handle.wait_timeout(timeout) {
        Ok(Some(output)) => Ok(output.clone()),
        Ok(None) => {
            let _ = handle.kill();
            Err(HostRepoError::Timeout {
                what,
                seconds: timeout.as_secs(),
            })
        }
        Err(e) => Err(HostRepoError::Git {
            what,
            detail: format!("waiting for git: {e}"),
        }),
    }
}

/// Stdout of a successful git run, trimmed; the failure quotes git's stderr.
fn stdout_of(output: Output, what: &'static str) -> Result<String, HostRepoError> {
    if !output.status.success() {
        return Err(HostRepoError::Git {
            what,
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Checks `repo` against the roots and resolves `git_ref` (HEAD when none) in it: what a job's
/// bundle carries. Run at submit and again when the bundle is made.
pub fn inspect(
    repo: &Path,
    roots: &[PathBuf],
    git_ref: Option<&str>,
    timeout: Duration,
) -> Result<ResolvedRepo, HostRepoError> {
    let path = confine(repo, roots)?;
    let is_repository = path.join(".git").exists()
        || (path.join("HEAD").is_file() && path.join("objects").is_dir());
    if !is_repository {
        return Err(HostRepoError::NotARepository);
    }
    let layout = run_git(
        host_git(
            &path,
            &[
                "rev-parse",
                "--path-format=absolute",
                "--git-path",
                "objects",
                "--show-object-format",
            ],
        ),
        "rev-parse (layout)",
        timeout,
    )?;
    if !layout.status.success() {
        return Err(HostRepoError::NotARepository);
    }
    let layout = String::from_utf8_lossy(&layout.stdout).into_owned();
    let mut lines = layout.lines();
    let (Some(objects), Some(object_format)) = (lines.next(), lines.next()) else {
        return Err(HostRepoError::Git {
            what: "rev-parse (layout)",
            detail: format!("unexpected answer {layout:?}"),
        });
    };
    let roots = canonical_roots(roots);
    let objects = check_object_store(Path::new(objects), &roots)?;
    let target = resolve_ref(&path, git_ref, timeout)?;
    Ok(ResolvedRepo {
        path,
        objects,
        object_format: object_format.trim().to_owned(),
        target,
    })
}

/// The canonical object store if it, every alternate it names (recursively, as git follows
/// them) and every symlink in them stay under `roots`.
fn check_object_store(objects: &Path, roots: &[PathBuf]) -> Result<PathBuf, HostRepoError> {
    let canonical = std::fs::canonicalize(objects).map_err(|_| HostRepoError::NotARepository)?;
    let mut seen = BTreeSet::new();
    let mut pending = vec![(canonical.clone(), 0usize)];
    while let Some((store, depth)) = pending.pop() {
        if !under_any(&store, roots) {
            return Err(HostRepoError::ObjectsOutsideRoots);
        }
        if !seen.insert(store.clone()) {
            continue;
        }
        check_symlinks(&store, roots, 0)?;
        if depth >= MAX_ALTERNATE_DEPTH {
            continue;
        }
        for alternate in alternates_of(&store)? {
            pending.push((alternate, depth + 1));
        }
    }
    Ok(canonical)
}

/// The stores `store/info/alternates` names, canonical. A line git would unquote, or one that
/// does not resolve, is refused rather than guessed at.
fn alternates_of(store: &Path) -> Result<Vec<PathBuf>, HostRepoError> {
    let text = match std::fs::read_to_string(store.join("info/alternates")) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(_) => return Err(HostRepoError::ObjectsOutsideRoots),
    };
    text.lines()
        .map(str::trim_end)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            if line.starts_with('"') {
                return Err(HostRepoError::ObjectsOutsideRoots);
            }
            std::fs::canonicalize(store.join(line)).map_err(|_| HostRepoError::ObjectsOutsideRoots)
        })
        .collect()
}

/// Every symlink in the object store (loose object folders, packs, info) must lead under the
/// roots: git follows them when it reads objects.
fn check_symlinks(dir: &Path, roots: &[PathBuf], depth: usize) -> Result<(), HostRepoError> {
    // objects/xx/OBJECT and objects/pack/FILE are as deep as git looks.
    const MAX_DEPTH: usize = 2;
    let entries = std::fs::read_dir(dir).map_err(|_| HostRepoError::ObjectsOutsideRoots)?;
    for entry in entries {
        let entry = entry.map_err(|_| HostRepoError::ObjectsOutsideRoots)?;
        let kind = entry
            .file_type()
            .map_err(|_| HostRepoError::ObjectsOutsideRoots)?;
        let path = entry.path();
        let real = if kind.is_symlink() {
            let target =
                std::fs::canonicalize(&path).map_err(|_| HostRepoError::ObjectsOutsideRoots)?;
            if !under_any(&target, roots) {
                return Err(HostRepoError::ObjectsOutsideRoots);
            }
            target
        } else {
            path
        };
        if depth < MAX_DEPTH && real.is_dir() {
            check_symlinks(&real, roots, depth + 1)?;
        }
    }
    Ok(())
}

/// `git rev-parse --verify` of `name` in the repository: its object id, or None if it names
/// nothing.
fn rev_parse(
    repo: &Path,
    extra: &[&str],
    name: &str,
    timeout: Duration,
) -> Result<Option<String>, HostRepoError> {
    let mut args = vec!["rev-parse", "--verify", "--quiet"];
    args.extend_from_slice(extra);
    args.extend(["--end-of-options", name]);
    let output = run_git(host_git(repo, &args), "rev-parse", timeout)?;
    match output.status.code() {
        Some(1) => Ok(None),
        _ => stdout_of(output, "rev-parse").map(Some),
    }
}

/// Resolves the job's ref (HEAD when none) to a branch, a tag or a commit of the repository.
fn resolve_ref(
    repo: &Path,
    git_ref: Option<&str>,
    timeout: Duration,
) -> Result<BundleTarget, HostRepoError> {
    let name = git_ref.unwrap_or("HEAD");
    if !is_valid_ref_name(name) {
        return Err(HostRepoError::InvalidRef(name.to_owned()));
    }
    let not_found = || HostRepoError::RefNotFound(name.to_owned());
    let full_name =
        rev_parse(repo, &["--symbolic-full-name"], name, timeout)?.ok_or_else(not_found)?;
    // A commit id has no full name; a detached HEAD's is `HEAD`.
    let tip_name = if full_name.is_empty() || full_name == "HEAD" {
        name
    } else {
        &full_name
    };
    let tip = rev_parse(repo, &[], tip_name, timeout)?.ok_or_else(not_found)?;
    let commit =
        rev_parse(repo, &[], &format!("{tip}^{{commit}}"), timeout)?.ok_or_else(not_found)?;
    if full_name.is_empty() || full_name == "HEAD" {
        Ok(BundleTarget::Commit { commit })
    } else if full_name.starts_with("refs/heads/") {
        Ok(BundleTarget::Branch { full_name, commit })
    } else if full_name.starts_with("refs/tags/") {
        Ok(BundleTarget::Tag {
            full_name,
            tag: tip,
            commit,
        })
    } else {
        Err(HostRepoError::RefNotCloneable {
            git_ref: name.to_owned(),
            full_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_git::git;

    /// `roots/repo`: two commits on main, a tag on the first, a branch `other` with a third.
    fn repo_with_refs(root: &Path) -> PathBuf {
        let repo = root.join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join("a"), "1").unwrap();
        git(&repo, &["add", "a"]);
        git(&repo, &["commit", "-q", "-m", "one"]);
        git(&repo, &["tag", "-a", "-m", "v1", "v1"]);
        std::fs::write(repo.join("a"), "2").unwrap();
        git(&repo, &["commit", "-q", "-am", "two"]);
        git(&repo, &["checkout", "-q", "-b", "other"]);
        std::fs::write(repo.join("a"), "3").unwrap();
        git(&repo, &["commit", "-q", "-am", "three"]);
        git(&repo, &["checkout", "-q", "main"]);
        repo
    }

    #[test]
    fn ref_names_follow_git_check_ref_format() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            "main",
            "feature/x",
            "v1.0",
            "HEAD",
            "0123abcd",
            "refs/heads/main",
            "a..b",
            "a~1",
            "a^",
            "a:b",
            "a b",
            "a?",
            "a*",
            "a[",
            "a\\b",
            "a@{1}",
            "@",
            "/a",
            "a/",
            "a//b",
            "a.",
            ".a",
            "a/.b",
            "a.lock",
            "a/b.lock/c",
            "a\u{7f}",
            "a\tb",
            "ünï",
            "@x",
        ];
        for name in cases {
            let git_says = std::process::Command::new("git")
                .args(["check-ref-format", "--allow-onelevel", name])
                .current_dir(dir.path())
                .status()
                .unwrap()
                .success();
            assert_eq!(is_valid_ref_name(name), git_says, "{name:?}");
        }
        for ours in ["-b", "--upload-pack=x", "", &"a".repeat(256)] {
            assert!(!is_valid_ref_name(ours), "{ours:?}");
        }
    }

    #[test]
    fn a_repo_must_lie_under_a_root_after_symlinks_are_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        let inside = repo_with_refs(&root);
        let outside_repo = repo_with_refs(&outside);
        std::os::unix::fs::symlink(&outside_repo, root.join("link")).unwrap();
        let roots = [root.clone()];

        assert_eq!(
            confine(&inside, &roots).unwrap(),
            inside.canonicalize().unwrap()
        );
        for bad in [
            outside_repo.clone(),
            root.join("link"),
            root.join("repo/../../outside/repo"),
            root.join("missing"),
            PathBuf::from("repo"),
        ] {
            let err = confine(&bad, &roots).unwrap_err();
            assert!(matches!(err, HostRepoError::OutsideRoots), "{bad:?}: {err}");
        }
        assert!(matches!(confine(&inside, &[]), Err(HostRepoError::NoRoots)));
        // A root reached through a symlink covers what it leads to.
        std::os::unix::fs::symlink(&root, dir.path().join("root-link")).unwrap();
        assert!(confine(&inside, &[dir.path().join("root-link")]).is_ok());
    }

    #[test]
    fn resolves_a_branch_a_tag_a_commit_and_head() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo_with_refs(dir.path());
        let roots = [dir.path().to_path_buf()];
        let main = git(&repo, &["rev-parse", "main"]);
        let first = git(&repo, &["rev-parse", "v1^{commit}"]);
        let tag = git(&repo, &["rev-parse", "v1"]);
        let inspect = |r: Option<&str>| inspect(&repo, &roots, r, RESOLVE_TIMEOUT);

        let resolved = inspect(None).unwrap();
        assert_eq!(resolved.path, repo.canonicalize().unwrap());
        assert_eq!(
            resolved.objects,
            repo.join(".git/objects").canonicalize().unwrap()
        );
        assert_eq!(resolved.object_format, "sha1");
        let branch = BundleTarget::Branch {
            full_name: "refs/heads/main".into(),
            commit: main.clone(),
        };
        assert_eq!(resolved.target, branch);
        assert_eq!(inspect(Some("main")).unwrap().target, branch);
        assert_eq!(
            inspect(Some("v1")).unwrap().target,
            BundleTarget::Tag {
                full_name: "refs/tags/v1".into(),
                tag,
                commit: first.clone()
            }
        );
        assert_eq!(
            inspect(Some(&first[..10])).unwrap().target,
            BundleTarget::Commit {
                commit: first.clone()
            }
        );
        git(&repo, &["checkout", "-q", "--detach", &first]);
        assert_eq!(
            inspect(None).unwrap().target,
            BundleTarget::Commit { commit: first }
        );
    }

    #[test]
    fn refuses_missing_and_uncloneable_refs() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo_with_refs(dir.path());
        std::fs::write(repo.join("a"), "stashed").unwrap();
        git(&repo, &["stash", "-q"]);
        let roots = [dir.path().to_path_buf()];
        let inspect = |r: Option<&str>| inspect(&repo, &roots, r, RESOLVE_TIMEOUT);
        assert!(matches!(
            inspect(Some("no-such-branch")),
            Err(HostRepoError::RefNotFound(r)) if r == "no-such-branch"
        ));
        assert!(matches!(
            inspect(Some("stash")),
            Err(HostRepoError::RefNotCloneable { full_name, .. }) if full_name == "refs/stash"
        ));
        assert!(matches!(
            inspect(Some("main~1")),
            Err(HostRepoError::InvalidRef(_))
        ));

        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        git(&empty, &["init", "-q"]);
        assert!(matches!(
            super::inspect(&empty, &roots, None, RESOLVE_TIMEOUT),
            Err(HostRepoError::RefNotFound(r)) if r == "HEAD"
        ));
        let plain = dir.path().join("plain");
        std::fs::create_dir(&plain).unwrap();
        assert!(matches!(
            super::inspect(&plain, &roots, None, RESOLVE_TIMEOUT),
            Err(HostRepoError::NotARepository)
        ));
    }

    #[test]
    fn an_object_store_leading_outside_the_roots_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let secret = repo_with_refs(&dir.path().join("secret"));
        let roots = [root.clone()];

        // A work tree whose .git file points at a repository outside.
        let worktree = root.join("worktree");
        std::fs::create_dir_all(&worktree).unwrap();
        std::fs::write(
            worktree.join(".git"),
            format!("gitdir: {}\n", secret.join(".git").display()),
        )
        .unwrap();
        assert!(matches!(
            inspect(&worktree, &roots, None, RESOLVE_TIMEOUT),
            Err(HostRepoError::ObjectsOutsideRoots)
        ));

        // A repository borrowing the outside one's objects.
        let borrower = repo_with_refs(&root.join("borrower"));
        let alternates = borrower.join(".git/objects/info/alternates");
        std::fs::write(
            &alternates,
            format!("{}\n", secret.join(".git/objects").display()),
        )
        .unwrap();
        assert!(matches!(
            inspect(&borrower, &roots, None, RESOLVE_TIMEOUT),
            Err(HostRepoError::ObjectsOutsideRoots)
        ));
        std::fs::remove_file(&alternates).unwrap();
        assert!(inspect(&borrower, &roots, None, RESOLVE_TIMEOUT).is_ok());

        // A pack folder that is a symlink to the outside one's.
        let packs = borrower.join(".git/objects/pack");
        std::fs::remove_dir_all(&packs).unwrap();
        std::os::unix::fs::symlink(secret.join(".git/objects/pack"), &packs).unwrap();
        assert!(matches!(
            inspect(&borrower, &roots, None, RESOLVE_TIMEOUT),
            Err(HostRepoError::ObjectsOutsideRoots)
        ));
    }

    #[test]
    fn git_is_trusted_with_that_one_repository_only() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo_with_refs(dir.path()).canonicalize().unwrap();
        let expression = host_git(&repo, &["rev-parse", "HEAD"]);
        let shown = format!("{expression:?}");
        assert!(
            shown.contains(&format!("safe.directory={}", repo.display())),
            "{shown}"
        );
        assert!(!shown.contains("safe.directory=*"), "{shown}");
        // Git treats the repository as another user's: only the safe.directory entry lets it in.
        let as_stranger = |e: duct::Expression| {
            e.env("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")
                .stdout_null()
                .stderr_null()
                .unchecked()
                .run()
                .unwrap()
                .status
                .success()
        };
        assert!(as_stranger(host_git(&repo, &["rev-parse", "HEAD"])));
        let plain = duct::cmd!("git", "-C", &repo, "rev-parse", "HEAD");
        assert!(!as_stranger(plain), "git trusts it without the entry");
        let other = repo_with_refs(&dir.path().join("other"));
        let elsewhere = duct::cmd!(
            "git",
            "-c",
            format!("safe.directory={}", repo.display()),
            "-C",
            &other,
            "rev-parse",
            "HEAD"
        );
        assert!(!as_stranger(elsewhere), "the entry covers one repository");
    }
}
