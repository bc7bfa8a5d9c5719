//! Host repositories: a job may only use one under `repo_roots` (symlinks resolved), and the
//! bundle its guest gets carries the job's ref only, made once however often the guest asks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::daemon::{repo_roots, Daemon};
use crate::common::git;
use crate::common::guest::{external_guest_fake, provisioning_file, Guest};

const WAIT: Duration = Duration::from_secs(30);
const BUNDLE_MADE: &str = "made the repository bundle";

/// A repository at `path` with two commits on `main`, a branch `other` with a file of its own
/// (checked out, so HEAD is not `main`), a stash and a note.
fn busy_repo(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    git(path, &["init", "-q", "-b", "main"]);
    std::fs::write(path.join("README"), "one\n").unwrap();
    git(path, &["add", "README"]);
    git(path, &["commit", "-q", "-m", "first"]);
    std::fs::write(path.join("README"), "two\n").unwrap();
    git(path, &["commit", "-q", "-am", "second"]);
    git(path, &["checkout", "-q", "-b", "other"]);
    std::fs::write(path.join("other.txt"), "only on the other branch\n").unwrap();
    git(path, &["add", "other.txt"]);
    git(path, &["commit", "-q", "-m", "other branch"]);
    std::fs::write(path.join("README"), "stashed work\n").unwrap();
    git(path, &["stash", "-q"]);
    git(path, &["notes", "add", "-m", "a note", "main"]);
    path.to_owned()
}

/// A daemon on the fake backend whose guests the test plays, with `roots` as its `repo_roots`.
fn start_daemon(dir: &Path, roots: &[&Path]) -> (Daemon, PathBuf) {
    let provisioning = provisioning_file(dir);
    let extra = format!(
        "{}{}",
        external_guest_fake(&provisioning),
        repo_roots(roots)
    );
    (Daemon::start(dir, "fake", &extra), provisioning)
}

fn submit_answer(daemon: &Daemon, repo: &Path, git_ref: Option<&str>) -> (u16, Value) {
    let mut body = json!({"profile": "balanced", "task": "t", "command": "true",
                          "repo": repo.to_str().unwrap()});
    if let Some(git_ref) = git_ref {
        body["ref"] = json!(git_ref);
    }
    daemon.post_json("/v1/jobs", &body)
}

fn message(answer: &Value) -> String {
    answer["error"]["message"].as_str().unwrap_or("").to_owned()
}

/// How many jobs the daemon knows and how many VMs it asked the backend for.
fn jobs_and_vms(daemon: &Daemon, provisioning: &Path) -> (usize, usize) {
    let (_, list) = daemon.get("/v1/jobs");
    let jobs = list["jobs"].as_array().map_or(0, Vec::len);
    let vms = std::fs::read_to_string(provisioning)
        .unwrap_or_default()
        .lines()
        .count();
    (jobs, vms)
}

/// Plays the job's guest: phone home, bootstrap, and the session token.
fn start_guest(provisioning: &Path, id: &str) -> (Guest, String) {
    let guest = Guest::of_job(provisioning, id, WAIT);
    let spec = guest.start();
    let token = spec["session_token"].as_str().unwrap().to_owned();
    (guest, token)
}

/// `GET /guest/v1/repo.bundle`, which must succeed.
fn fetch_bundle(guest: &Guest, token: &str) -> Vec<u8> {
    let (answer, bytes) = guest.get(token, "/guest/v1/repo.bundle");
    assert_eq!(answer.status, 200, "{}", answer.text);
    bytes
}

/// `git bundle list-heads`: (object id, ref name) pairs.
fn heads(dir: &Path, bundle: &[u8]) -> Vec<(String, String)> {
    let path = dir.join("downloaded.bundle");
    std::fs::write(&path, bundle).unwrap();
    git(dir, &["bundle", "list-heads", path.to_str().unwrap()])
        .lines()
        .map(|line| {
            let (id, name) = line.split_once(' ').unwrap();
            (id.to_owned(), name.to_owned())
        })
        .collect()
}

/// The daemon's log lines saying it made a bundle for `id`.
fn bundles_made(daemon: &Daemon, id: &str) -> usize {
    daemon
        .log()
        .lines()
        .filter(|l| l.contains(BUNDLE_MADE) && l.contains(id))
        .count()
}

#[test]
fn a_repo_outside_repo_roots_is_refused_at_submit_and_no_vm_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let inside = busy_repo(&root.join("app"));
    let outside = busy_repo(&dir.path().join("elsewhere/app"));
    let (daemon, provisioning) = start_daemon(dir.path(), &[&root]);

    let (status, answer) = submit_answer(&daemon, &outside, None);
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "bad_request");
    let refused = message(&answer);
    assert!(refused.contains("repo_roots"), "{refused}");
    // A path that does not exist gets the same answer: it does not tell what is on the host.
    let missing = dir.path().join("elsewhere/nothing");
    let (status, answer) = submit_answer(&daemon, &missing, None);
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        message(&answer).replace(missing.to_str().unwrap(), "REPO"),
        refused.replace(outside.to_str().unwrap(), "REPO")
    );
    assert_eq!(jobs_and_vms(&daemon, &provisioning), (0, 0));

    // A repo under the root still runs.
    let (status, answer) = submit_answer(&daemon, &inside, Some("main"));
    assert_eq!(status, 201, "{answer}");
    let id = answer["id"].as_str().unwrap();
    let (guest, token) = start_guest(&provisioning, id);
    assert!(!fetch_bundle(&guest, &token).is_empty());
    guest.finish(&token, 0);
    assert_eq!(daemon.wait_terminal(id, WAIT)["status"], "COMPLETED");
    assert_eq!(jobs_and_vms(&daemon, &provisioning), (1, 1));
}

#[test]
fn a_repo_under_the_root_that_is_a_symlink_to_outside_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let outside = busy_repo(&dir.path().join("elsewhere/app"));
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    let (daemon, provisioning) = start_daemon(dir.path(), &[&root]);

    let (status, answer) = submit_answer(&daemon, &root.join("link"), None);
    assert_eq!(status, 400, "{answer}");
    assert!(message(&answer).contains("repo_roots"), "{answer}");
    // `..` out of the root is resolved too.
    let climbing = root.join("../elsewhere/app");
    let (status, answer) = submit_answer(&daemon, &climbing, None);
    assert_eq!(status, 400, "{answer}");
    assert!(message(&answer).contains("repo_roots"), "{answer}");
    assert_eq!(jobs_and_vms(&daemon, &provisioning), (0, 0));
    assert_eq!(git(&outside, &["status", "--porcelain"]), "", "untouched");
}

#[test]
fn no_repo_roots_means_no_host_repository_and_a_missing_ref_is_refused_at_submit() {
    let dir = tempfile::tempdir().unwrap();
    let repo = busy_repo(&dir.path().join("root/app"));
    let (daemon, provisioning) = start_daemon(dir.path(), &[]);
    let (status, answer) = submit_answer(&daemon, &repo, None);
    assert_eq!(status, 400, "{answer}");
    assert!(
        message(&answer).contains("`repo_roots`") && message(&answer).contains("empty"),
        "{answer}"
    );
    assert_eq!(jobs_and_vms(&daemon, &provisioning), (0, 0));
    drop(daemon);

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let repo = busy_repo(&root.join("app"));
    let (daemon, provisioning) = start_daemon(dir.path(), &[&root]);
    for (git_ref, says) in [
        ("no-such-branch", "names no branch, tag or commit"),
        ("stash", "only a branch, a tag or a commit id"),
        ("main..other", "`ref` must be"),
        ("-x", "`ref` must be"),
    ] {
        let (status, answer) = submit_answer(&daemon, &repo, Some(git_ref));
        assert_eq!(status, 400, "{git_ref}: {answer}");
        assert!(message(&answer).contains(says), "{git_ref}: {answer}");
    }
    assert_eq!(jobs_and_vms(&daemon, &provisioning), (0, 0));
}

#[test]
fn the_guests_bundle_carries_the_requested_ref_only_and_the_job_completes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let repo = busy_repo(&root.join("app"));
    let main = git(&repo, &["rev-parse", "main"]);
    let (daemon, provisioning) = start_daemon(dir.path(), &[&root]);
    let (status, answer) = submit_answer(&daemon, &repo, Some("main"));
    assert_eq!(status, 201, "{answer}");
    let id = answer["id"].as_str().unwrap();
    let (guest, token) = start_guest(&provisioning, id);

    let bundle = fetch_bundle(&guest, &token);
    let listed = heads(dir.path(), &bundle);
    assert_eq!(
        listed,
        [
            (main.clone(), "HEAD".to_owned()),
            (main, "refs/heads/main".to_owned())
        ],
        "the requested branch and a HEAD at it: no other branch, stash or note"
    );
    // What a clone of it holds: main's history and nothing of the other branch or the stash.
    let clone = dir.path().join("clone");
    let bundle_path = dir.path().join("downloaded.bundle");
    git(
        dir.path(),
        &["clone", "-q", bundle_path.to_str().unwrap(), "clone"],
    );
    assert_eq!(
        std::fs::read_to_string(clone.join("README")).unwrap(),
        "two\n"
    );
    let everything = git(&clone, &["log", "--all", "--format=%s"]);
    assert_eq!(everything, "second\nfirst", "{everything}");

    let log = guest.post(&token, "/guest/v1/log", b"cloned\n".to_vec());
    assert_eq!(log.status, 204, "{}", log.text);
    guest.finish(&token, 0);
    let job = daemon.wait_terminal(id, WAIT);
    assert_eq!(job["status"], "COMPLETED", "{job}");
    assert!(
        !dir.path().join("data/bundles").join(id).exists(),
        "the bundle goes when the job ends"
    );
    // The host repository is as it was: HEAD on `other`, the stash kept.
    assert_eq!(git(&repo, &["rev-parse", "--abbrev-ref", "HEAD"]), "other");
    assert_eq!(git(&repo, &["stash", "list"]).lines().count(), 1);
}

#[test]
fn the_bundle_is_made_once_however_often_and_however_many_ask() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let repo = busy_repo(&root.join("app"));
    let (daemon, provisioning) = start_daemon(dir.path(), &[&root]);
    let (status, answer) = submit_answer(&daemon, &repo, None);
    assert_eq!(status, 201, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    let (guest, token) = start_guest(&provisioning, &id);

    let at_once: Vec<Vec<u8>> = std::thread::scope(|s| {
        let requests: Vec<_> = (0..6)
            .map(|_| s.spawn(|| fetch_bundle(&guest, &token)))
            .collect();
        requests.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let first = at_once[0].clone();
    assert!(at_once.iter().all(|b| *b == first), "one bundle for all");
    let listed = heads(dir.path(), &first);
    let head = git(&repo, &["rev-parse", "HEAD"]);
    assert_eq!(
        listed,
        [
            (head.clone(), "HEAD".to_owned()),
            (head, "refs/heads/other".to_owned())
        ]
    );

    // The repository moves on; the job keeps the bundle it was given.
    std::fs::write(repo.join("other.txt"), "later\n").unwrap();
    git(&repo, &["commit", "-q", "-am", "later"]);
    for _ in 0..3 {
        assert_eq!(fetch_bundle(&guest, &token), first);
    }
    assert_eq!(bundles_made(&daemon, &id), 1, "{}", daemon.log());

    guest.finish(&token, 0);
    assert_eq!(daemon.wait_terminal(&id, WAIT)["status"], "COMPLETED");
    assert!(!dir.path().join("data/bundles").join(&id).exists());
}

#[test]
fn a_repo_swapped_after_submit_is_refused_at_bundle_time_without_host_paths() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let repo = busy_repo(&root.join("app"));
    let outside = busy_repo(&dir.path().join("elsewhere/secret"));
    let (daemon, provisioning) = start_daemon(dir.path(), &[&root]);
    let (status, answer) = submit_answer(&daemon, &repo, Some("main"));
    assert_eq!(status, 201, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    let (guest, token) = start_guest(&provisioning, &id);

    // Between submit and bundle, the repo becomes a symlink to a repository outside the roots.
    std::fs::rename(&repo, root.join("moved")).unwrap();
    std::os::unix::fs::symlink(&outside, &repo).unwrap();
    for _ in 0..2 {
        let (answer, _) = guest.get(&token, "/guest/v1/repo.bundle");
        assert_eq!(answer.status, 409, "{}", answer.text);
        let said = message(&answer.json);
        assert!(said.contains("repo_roots"), "{said}");
        assert!(!said.contains(dir.path().to_str().unwrap()), "{said}");
    }
    assert_eq!(bundles_made(&daemon, &id), 0);

    // The guest reports its failed checkout; the job ends and the other repository is as it was.
    guest.finish(&token, 125);
    let job = daemon.wait_terminal(&id, WAIT);
    assert_eq!(job["status"], "FAILED", "{job}");
    assert_eq!(git(&outside, &["stash", "list"]).lines().count(), 1);
}
