//! Snapshot starts end to end, with real VMs: the daemon on the local QEMU backend makes a
//! template snapshot once, restores sandboxes from it, gives each its own identity (hostname,
//! clock, entropy, bootstrap token), and copes with a rebuilt template, a broken snapshot and
//! being killed while it makes or restores one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::daemon::{repo_roots, Daemon};
use common::vm::{
    artifact_at, assert_nothing_left, free_port, git_repo, images, qemu_processes, truncate_file,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const TUNING: &str =
    "phase_timeouts: {cloud_init: 90s, guest_agent: 60s, run: 120s, upload: 60s, destroy: 30s}\n\
     intervals: {guest_poll: 250ms, reconcile: 2s}\n\
     governor: {budget: {disk_min_free_percent: null}, boot_cap: {initial: 2}}\n";

/// The daemon on the QEMU backend, its templates in `images_dir`.
fn daemon(dir: &Path, images_dir: &Path, extra: &str) -> Daemon {
    std::fs::create_dir_all(dir.join("tuning")).unwrap();
    std::fs::write(dir.join("tuning/default.yaml"), TUNING).unwrap();
    // The jobs' host repository (`git_repo`) lives in the test's folder.
    let qemu = format!(
        "{roots}qemu:\n  images_dir: {}\n  accel: tcg\n  memory_mb_cap: 384\n  cores_cap: 1\n{extra}",
        images_dir.display(),
        roots = repo_roots(&[dir]),
    );
    Daemon::start(dir, "qemu", &qemu)
}

fn snapshots(dir: &Path) -> PathBuf {
    dir.join("data/snapshots")
}

/// The finished snapshots in the daemon's data folder.
fn snapshot_ids(dir: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(snapshots(dir))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.len() == 16)
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

fn events(daemon: &Daemon, id: &str) -> Vec<(String, String)> {
    let (_, answer) = daemon.get(&format!("/v1/jobs/{id}/events"));
    answer["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or_default().to_owned(),
                e["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn has_event(events: &[(String, String)], kind: &str, text: &str) -> bool {
    events.iter().any(|(k, m)| k == kind && m.contains(text))
}

fn phases(job: &Value) -> Vec<String> {
    job["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_restored_job_completes_with_its_output_and_artifact_and_says_where_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let repo = git_repo(dir.path());
    let daemon = daemon(dir.path(), &images(), "");
    let submit = || {
        daemon.submit(&json!({
            "profile": "balanced",
            "task": "restored",
            "repo": repo.display().to_string(),
            "command": "cat hello.txt; mkdir -p out; hostname > out/host.txt; echo artifact-written",
            "artifacts": ["out/**"],
            "start": "snapshot",
        }))
    };

    // The first job makes the snapshot in its clone phase, then restores from it.
    let first = submit();
    let job = daemon.wait_terminal(&first, Duration::from_secs(240));
    assert_eq!(job["status"], "COMPLETED", "{job}\n{}", daemon.log());
    let ids = snapshot_ids(dir.path());
    assert_eq!(ids.len(), 1, "one snapshot: {ids:?}");
    let snapshot = &ids[0];
    let history = events(&daemon, &first);
    assert!(
        has_event(&history, "snapshot", &format!("making snapshot {snapshot}")),
        "{history:?}"
    );
    assert!(
        has_event(
            &history,
            "snapshot",
            &format!("snapshot {snapshot} made in")
        ),
        "{history:?}"
    );
    assert!(
        has_event(
            &history,
            "restored",
            &format!("restored from snapshot {snapshot}")
        ),
        "{history:?}"
    );

    // The second restores without making anything.
    let second = submit();
    let job = daemon.wait_terminal(&second, Duration::from_secs(120));
    assert_eq!(job["status"], "COMPLETED", "{job}\n{}", daemon.log());
    assert_eq!(job["start"], "snapshot");
    assert_eq!(job["start_method"], "restored", "{job}");
    assert_eq!(job["snapshot_id"], snapshot.as_str(), "{job}");
    assert_eq!(
        phases(&job),
        [
            "clone",
            "start",
            "cloud_init",
            "guest_agent",
            "run",
            "upload",
            "destroy"
        ]
    );
    let history = events(&daemon, &second);
    assert!(!has_event(&history, "snapshot", "making"), "{history:?}");
    assert!(has_event(&history, "restored", snapshot), "{history:?}");

    let output = daemon.job_log(&second);
    assert!(output.contains("hello from the host repo"), "{output}");
    assert!(output.contains("artifact-written"), "{output}");
    let (_, listing) = daemon.get(&format!("/v1/jobs/{second}/artifacts"));
    // Beside the result bundle (out/ was left uncommitted), the job's own artifact.
    let artifact = artifact_at(&listing, "out/host.txt");
    assert_eq!(artifact["path"], "out/host.txt", "{listing}");
    let bytes = daemon.get_bytes(&format!("/v1/jobs/{second}/artifacts/out/host.txt"));
    assert_eq!(artifact["sha256"], hex::encode(Sha256::digest(&bytes)));
    // The restored guest took the sandbox's own name, not the template VM's.
    let sandbox = job["sandbox_id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(String::from_utf8_lossy(&bytes).trim(), sandbox, "{job}");
    assert_nothing_left(dir.path());
}

/// The guest's lines `key=value` in a job's log.
fn guest_value(log: &str, key: &str) -> String {
    log.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {log}"))
        .trim()
        .to_owned()
}

#[test]
fn two_sandboxes_restored_at_once_have_their_own_hostname_randomness_and_the_hosts_clock() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path(), &images(), "");
    let warm = daemon
        .submit(&json!({"profile": "balanced", "task": "make the snapshot", "command": "true"}));
    let job = daemon.wait_terminal(&warm, Duration::from_secs(240));
    assert_eq!(job["status"], "COMPLETED", "{job}\n{}", daemon.log());
    // The snapshot's clock is now behind the host's by more than the tolerance below.
    std::thread::sleep(Duration::from_secs(6));

    let command = "echo host=$(hostname); echo rand=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'); echo clock=$(date +%s)";
    let ids: Vec<String> = (0..2)
        .map(|_| {
            daemon.submit(&json!({"profile": "balanced", "task": "twins", "command": command}))
        })
        .collect();
    let mut seen = Vec::new();
    for id in &ids {
        let job = daemon.wait_terminal(id, Duration::from_secs(180));
        assert_eq!(job["status"], "COMPLETED", "{job}\n{}", daemon.log());
        assert_eq!(job["start_method"], "restored", "{job}");
        let log = daemon.job_log(id);
        let clock: i64 = guest_value(&log, "clock").parse().unwrap();
        let run = job["phases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["phase"] == "run")
            .unwrap()
            .clone();
        let run_start = run["started_at_ms"].as_i64().unwrap() / 1000;
        let run_end = run["ended_at_ms"].as_i64().unwrap() / 1000;
        assert!(
            clock >= run_start - 2 && clock <= run_end + 2,
            "guest clock {clock} outside the run phase [{run_start}, {run_end}] ± 2 s"
        );
        seen.push((
            guest_value(&log, "host"),
            guest_value(&log, "rand"),
            job["sandbox_id"].clone(),
        ));
    }
    assert_ne!(seen[0].0, seen[1].0, "hostnames differ");
    for (host, rand, sandbox) in &seen {
        assert_eq!(
            Value::from(host.as_str()),
            *sandbox,
            "the hostname is the sandbox's"
        );
        assert_eq!(rand.len(), 64, "{rand}");
    }
    assert_ne!(seen[0].1, seen[1].1, "random numbers differ");
    assert_nothing_left(dir.path());
}

/// A private copy of the test template (hard links where the filesystem allows), so that a
/// test can rebuild it: `rebuild` publishes a new build the way build-guest-image.sh does.
fn own_template(dir: &Path) -> PathBuf {
    let source = std::fs::canonicalize(images().join("root.qcow2"))
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    let images_dir = dir.join("images");
    publish_build(&images_dir, &source, "build-1");
    images_dir
}

fn publish_build(images_dir: &Path, source: &Path, build: &str) {
    let target = images_dir.join("builds").join(build);
    std::fs::create_dir_all(&target).unwrap();
    for file in ["vmlinuz", "initrd.img", "root.qcow2", "manifest.json"] {
        if std::fs::hard_link(source.join(file), target.join(file)).is_err() {
            std::fs::copy(source.join(file), target.join(file)).unwrap();
        }
    }
    let link = images_dir.join(".current.link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(format!("builds/{build}"), &link).unwrap();
    std::fs::rename(&link, images_dir.join("current")).unwrap();
    for file in ["vmlinuz", "initrd.img", "root.qcow2", "manifest.json"] {
        let stable = images_dir.join(file);
        if !stable.exists() {
            std::os::unix::fs::symlink(format!("current/{file}"), stable).unwrap();
        }
    }
}

#[test]
fn a_rebuilt_template_gets_a_new_snapshot_and_a_broken_one_boots_cold() {
    let dir = tempfile::tempdir().unwrap();
    let images_dir = own_template(dir.path());
    let daemon = daemon(dir.path(), &images_dir, "");
    let run = |task: &str| {
        let id = daemon.submit(
            &json!({"profile": "balanced", "task": task, "command": "echo ran-$AGENTLAB_TASK"}),
        );
        let job = daemon.wait_terminal(&id, Duration::from_secs(240));
        assert_eq!(job["status"], "COMPLETED", "{job}\n{}", daemon.log());
        assert!(daemon.job_log(&id).contains(&format!("ran-{task}")));
        (id, job)
    };
    let (_, job) = run("first");
    let old = snapshot_ids(dir.path());
    assert_eq!(old.len(), 1);
    assert_eq!(job["snapshot_id"], old[0].as_str());

    // A rebuild publishes another build: the next job makes and restores a new snapshot, and
    // the old one, which no sandbox uses any more, is swept.
    let source = std::fs::canonicalize(images_dir.join("root.qcow2"))
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    publish_build(&images_dir, &source, "build-2");
    let (id, job) = run("rebuilt");
    let new = job["snapshot_id"].as_str().unwrap().to_owned();
    assert_ne!(new, old[0], "{job}");
    assert!(has_event(
        &events(&daemon, &id),
        "snapshot",
        &format!("making snapshot {new}")
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while snapshot_ids(dir.path()) != [new.clone()] {
        assert!(
            Instant::now() < deadline,
            "the old snapshot is still there: {:?}",
            snapshot_ids(dir.path())
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A truncated state file: the restore fails, the snapshot is discarded with the reason in
    // the job's events, the job boots cold and completes, and the next job makes it again.
    truncate_file(&snapshots(dir.path()).join(&new).join("state"), 1, 3);
    let (id, job) = run("broken");
    assert_eq!(job["start_method"], "cold", "{job}");
    let history = events(&daemon, &id);
    assert!(
        has_event(
            &history,
            "snapshot",
            &format!("snapshot {new} did not restore")
        ),
        "{history:?}"
    );
    let (_, job) = run("remade");
    assert_eq!(job["start_method"], "restored", "{job}");
    assert_eq!(job["snapshot_id"], new.as_str());
    assert_nothing_left(dir.path());
}

#[test]
fn a_daemon_killed_while_it_makes_or_restores_a_snapshot_leaves_nothing_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let guest = format!("guest_listen: 127.0.0.1:{}\n", free_port());
    let mut first = daemon(dir.path(), &images(), &guest);
    let making = first.submit(&json!({"profile": "balanced", "task": "t", "command": "echo made"}));
    // Killed while the template VM boots in the clone phase.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !has_event(&events(&first, &making), "snapshot", "making snapshot") {
        assert!(Instant::now() < deadline, "no making: {}", first.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    first.kill9();
    let needle = snapshots(dir.path()).display().to_string();
    assert!(
        !qemu_processes(&needle).is_empty(),
        "the template VM outlives the daemon"
    );

    // The next daemon clears the interrupted making and the job makes the snapshot again.
    let mut second = daemon(dir.path(), &images(), &guest);
    let job = second.wait_terminal(&making, Duration::from_secs(240));
    assert_eq!(job["status"], "COMPLETED", "{job}\n{}", second.log());
    assert_eq!(job["start_method"], "restored", "{job}");

    // Killed as soon as a restore begins.
    let restoring =
        second.submit(&json!({"profile": "balanced", "task": "t", "command": "echo restored"}));
    second.wait_phase(&restoring, "start", Duration::from_secs(120));
    second.kill9();
    let third = daemon(dir.path(), &images(), &guest);
    // The resumed start phase finds the VM restored, or restores it again if the kill cut the
    // load short, and the job goes on.
    let job = third.wait_terminal(&restoring, Duration::from_secs(240));
    assert_eq!(job["status"], "COMPLETED", "{job}\n{}", third.log());
    assert_eq!(job["start_method"], "restored", "{job}");
    assert_nothing_left(dir.path());
    assert_eq!(snapshot_ids(dir.path()).len(), 1);
}
