//! End to end with real VMs: the daemon on the local QEMU backend runs jobs in guests booted from
//! the test template (`scripts/build-guest-image.sh`; `AGENTLAB_TEST_IMAGES` says where it is).
//! Every test checks that no qemu process and no per-sandbox file is left afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::daemon::{repo_roots, Daemon};
use common::vm::{
    assert_nothing_left, free_port, git_repo, images, qemu_processes, runnerless_images,
    stripped_runner,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Starts the daemon on the QEMU backend with `tuning` as its tuning file. These tests are about
/// the lifecycle, not admission: the governor's disk rule is off, since the machine running them
/// may not have a profile's 30 GB free (the test VMs' qcow2 overlays are thin and tiny).
fn daemon(dir: &Path, tuning: &str, extra: &str) -> Daemon {
    daemon_with_images(dir, tuning, &images(), extra)
}

/// `daemon`, with the templates of `images`.
fn daemon_with_images(dir: &Path, tuning: &str, images: &Path, extra: &str) -> Daemon {
    std::fs::create_dir_all(dir.join("tuning")).unwrap();
    let tuning = format!("{tuning}governor: {{budget: {{disk_min_free_percent: null}}}}\n");
    std::fs::write(dir.join("tuning/default.yaml"), tuning).unwrap();
    // The jobs' host repository (`git_repo`) lives in the test's folder.
    let qemu = format!(
        "{roots}qemu:\n  images_dir: {}\n  accel: tcg\n  memory_mb_cap: 384\n  cores_cap: 1\n{extra}",
        images.display(),
        roots = repo_roots(&[dir]),
    );
    Daemon::start(dir, "qemu", &qemu)
}

const TUNING: &str =
    "phase_timeouts: {cloud_init: 90s, guest_agent: 60s, run: 120s, upload: 60s, destroy: 30s}\n\
                      intervals: {guest_poll: 250ms, reconcile: 5s}\n";

#[test]
fn a_job_runs_in_a_real_vm_and_its_output_and_artifact_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let repo = git_repo(dir.path());
    let daemon = daemon(dir.path(), TUNING, "");
    let id = daemon.submit(&json!({
        "profile": "balanced",
        "task": "summarise hello.txt",
        "repo": repo.display().to_string(),
        "command": "cat hello.txt; mkdir -p out; printf 'task=%s\\n' \"$AGENTLAB_TASK\" > out/report.txt; wc -c < hello.txt >> out/report.txt; echo artifact-written",
        "artifacts": ["out/**"],
        "env": {"SECRET_TOKEN": "do-not-print-me"},
    }));
    let job = daemon.wait_terminal(&id, Duration::from_secs(240));
    assert_eq!(job["status"], "COMPLETED", "{job}\n{}", daemon.log());
    assert_eq!(job["exit_code"], 0);
    let phases: Vec<&str> = job["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
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

    let output = daemon.job_log(&id);
    assert!(output.contains("hello from the host repo"), "{output}");
    assert!(output.contains("artifact-written"), "{output}");

    let (_, listing) = daemon.get(&format!("/v1/jobs/{id}/artifacts"));
    // The report, and the result bundle: out/ was left uncommitted in the checkout.
    let artifacts = listing["artifacts"].as_array().unwrap();
    let paths: Vec<&str> = artifacts
        .iter()
        .map(|a| a["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [".agentlab/result.bundle", "out/report.txt"],
        "{listing}"
    );
    let artifacts = &artifacts[1..];
    assert_eq!(job["changes"]["commits"], 1, "{job}");
    assert_eq!(job["changes"]["files"], 1, "{job}");
    let bytes = daemon.get_bytes(&format!("/v1/jobs/{id}/artifacts/out/report.txt"));
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        "task=summarise hello.txt\n25\n"
    );
    assert_eq!(artifacts[0]["sha256"], hex::encode(Sha256::digest(&bytes)));
    // Cloud-init's verdict, read in the VM the snapshot was made from, is the job's and the
    // template's.
    assert_eq!(
        cloud_init_events(&daemon, &id),
        ["cloud-init finished without errors (DataSourceNoCloud [seed=/dev/vdb])"]
    );
    let (_, status) = daemon.get("/v1/status");
    assert_eq!(
        status["templates"],
        json!([{"backend": "qemu", "template": "", "job_id": id, "errors": [],
                "checked_at_ms": status["templates"][0]["checked_at_ms"]}]),
        "{status}"
    );
    assert_nothing_left(dir.path());
    assert!(!daemon.log().contains("do-not-print-me"));
}

/// The messages of the job's `cloud-init` events.
fn cloud_init_events(daemon: &Daemon, id: &str) -> Vec<String> {
    daemon.event_messages(id, "cloud-init")
}

#[test]
fn a_failing_command_fails_the_job_with_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path(), TUNING, "");
    let id = daemon.submit(
        &json!({"profile": "balanced", "task": "t", "command": "echo about-to-fail; exit 7"}),
    );
    let job = daemon.wait_terminal(&id, Duration::from_secs(240));
    assert_eq!(
        (job["status"].as_str(), job["exit_code"].as_i64()),
        (Some("FAILED"), Some(7)),
        "{job}"
    );
    assert!(daemon.job_log(&id).contains("about-to-fail"));
    assert_nothing_left(dir.path());
}

#[test]
fn a_command_that_overruns_the_run_timeout_ends_timeout_with_the_vm_destroyed() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path(), TUNING, "");
    let id = daemon.submit(&json!({"profile": "balanced", "task": "t", "command": "sleep 600", "run_timeout_seconds": 5}));
    let job = daemon.wait_terminal(&id, Duration::from_secs(240));
    assert_eq!(job["status"], "TIMEOUT", "{job}");
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("phase run timed out"),
        "{job}"
    );
    assert_nothing_left(dir.path());
}

#[test]
fn a_guest_that_never_phones_home_ends_in_a_cloud_init_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // The guest's phone-home URL points at a port nothing forwards: it never gets through. A
    // cold boot: a restored guest does not phone home (the daemon gives it its identity).
    let tuning = "phase_timeouts: {cloud_init: 25s}\n";
    let daemon = daemon(dir.path(), tuning, "guest_url: http://10.0.2.100:81\n");
    let id = daemon
        .submit(&json!({"profile": "balanced", "task": "t", "command": "true", "start": "cold"}));
    let job = daemon.wait_terminal(&id, Duration::from_secs(180));
    assert_eq!(job["status"], "TIMEOUT", "{job}");
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("phase cloud_init timed out"),
        "{job}"
    );
    assert_nothing_left(dir.path());
}

#[test]
fn a_daemon_killed_while_a_vm_runs_is_reconciled_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    // Running VMs forward to the guest port they were started with, so it must survive the restart.
    let guest = format!("guest_listen: 127.0.0.1:{}\n", free_port());
    let mut first = daemon(dir.path(), TUNING, &guest);
    let id = first.submit(&json!({"profile": "balanced", "task": "t", "command": "echo command-is-running; sleep 8; echo finished-after-restart"}));
    first.wait_phase(&id, "run", Duration::from_secs(180));
    // Killed once the command runs, not while the guest agent starts the runner: a daemon that
    // dies in the middle of that cannot know whether a runner started, never starts a second
    // one, and the job times out (by design; see lifecycle.rs).
    first.wait_log(&id, "command-is-running", Duration::from_secs(120));
    first.kill9();
    assert!(
        !qemu_processes(&dir.path().display().to_string()).is_empty(),
        "the VM outlives the daemon"
    );

    // Behind the dead daemon's back: a folder of its own the store never recorded, and one made
    // by another daemon sharing the sandboxes folder.
    let instance = std::fs::read_to_string(dir.path().join("data/instance-id")).unwrap();
    let sandboxes = dir.path().join("data/sandboxes");
    for (name, owner) in [
        ("sandbox-0000deadbee1", instance.trim()),
        ("sandbox-0000deadbee2", "0000-another"),
    ] {
        let record = json!({
            "name": name, "job_id": "j", "created_ms": 0,
            "template": {"kernel": "/i/k", "initrd": "/i/i", "root_disk": "/i/r", "kernel_cmdline": ""},
            "cores": 1, "memory_mb": 256, "disk_gb": 1, "network": "restricted", "owner": owner
        });
        std::fs::create_dir_all(sandboxes.join(name)).unwrap();
        std::fs::write(
            sandboxes.join(name).join("sandbox.json"),
            record.to_string(),
        )
        .unwrap();
    }

    let second = daemon(dir.path(), TUNING, &guest);
    let job: Value = second.wait_terminal(&id, Duration::from_secs(240));
    // The VM and its runner survived, so the resumed actor sees the job through.
    assert_eq!(job["status"], "COMPLETED", "{job}\n{}", second.log());
    assert!(second.job_log(&id).contains("finished-after-restart"));
    let (_, running) = second.get("/v1/jobs?status=RUNNING");
    assert!(running["jobs"].as_array().unwrap().is_empty());
    assert!(
        !sandboxes.join("sandbox-0000deadbee1").exists(),
        "ours is destroyed"
    );
    assert!(sandboxes.join("sandbox-0000deadbee2/sandbox.json").exists());
    let (_, status) = second.get("/v1/status");
    assert_eq!(
        status["foreign_vms"][0]["name"], "sandbox-0000deadbee2",
        "{status}"
    );
    assert_eq!(
        status["foreign_vms"][0]["owner"], "0000-another",
        "{status}"
    );
    std::fs::remove_dir_all(sandboxes.join("sandbox-0000deadbee2")).unwrap();
    assert_nothing_left(dir.path());
}

/// With `accel: auto` the KVM probe runs when the daemon starts, not in the first job's start
/// phase: its answer is in `GET /v1/status` before any job is submitted, and the first start
/// runs no second probe. The QEMU here is a script that plays the probe's kernel panic and fails
/// every VM launch; nothing boots.
#[test]
fn the_kvm_probe_runs_at_start_up_not_in_the_first_jobs_start_phase() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for file in ["vmlinuz", "initrd.img"] {
        std::fs::write(images.join(file), b"kernel").unwrap();
    }
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(images.join("root.qcow2"))
        .arg("64M")
        .status()
        .unwrap();
    assert!(status.success());
    let calls = dir.path().join("qemu-calls.log");
    let qemu = dir.path().join("qemu-system-x86_64");
    std::fs::write(
        &qemu,
        format!(
            "#!/bin/sh\necho \"$*\" >> {calls}\ncase \"$*\" in\n\
             --version) echo 'QEMU emulator version 9.0.0' ;;\n\
             *kvm-probe-*) serial=$(echo \"$*\" | sed 's/.*file:\\([^ ]*\\).*/\\1/')\n\
             echo 'Kernel panic - not syncing: VFS' > \"$serial\" ;;\n\
             *) echo 'no VMs here' >&2; exit 1 ;;\nesac\n",
            calls = calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    let kvm_usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let probes = || {
        std::fs::read_to_string(&calls)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("kvm-probe-"))
            .count()
    };

    let config = format!(
        "qemu:\n  images_dir: {}\n  qemu_binary: {}\n  accel: auto\n  memory_mb_cap: 384\n  cores_cap: 1\n",
        images.display(),
        qemu.display()
    );
    let daemon = Daemon::start(dir.path(), "qemu", &config);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let (_, status) = daemon.get("/v1/status");
        if !status["accelerator"].is_null() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no probe answer: {status}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let expected = if kvm_usable { "kvm" } else { "tcg" };
    assert_eq!(status["accelerator"], expected, "{}", daemon.log());
    assert_eq!(probes(), usize::from(kvm_usable));
    assert!(
        daemon.log().contains("KVM"),
        "the answer is logged: {}",
        daemon.log()
    );

    let id = daemon.submit(&json!({"profile": "balanced", "task": "t", "command": "true"}));
    let job = daemon.wait_terminal(&id, Duration::from_secs(60));
    assert_eq!(job["status"], "FAILED", "{job}");
    assert!(job["error"].as_str().unwrap().contains("start"), "{job}");
    let launches: Vec<String> = std::fs::read_to_string(&calls)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("-name sandbox-"))
        .map(str::to_owned)
        .collect();
    assert!(!launches.is_empty(), "the start phase launched qemu");
    assert!(
        launches[0].contains(&format!("-accel {expected}")),
        "{launches:?}"
    );
    assert_eq!(
        probes(),
        usize::from(kvm_usable),
        "no probe in the start phase"
    );
}

/// `git` in `repo`, its stdout trimmed.
fn git_out(repo: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn the_agents_commit_and_uncommitted_edit_come_back_as_a_branch_and_nothing_else_changes() {
    let dir = tempfile::tempdir().unwrap();
    let repo = git_repo(dir.path());
    // The user's own state in the host repo, which the job must leave as it is.
    git_out(&repo, &["branch", "feature"]);
    std::fs::write(repo.join("wip.txt"), "the user's uncommitted work\n").unwrap();
    let refs_before = git_out(
        &repo,
        &["for-each-ref", "--format=%(refname) %(objectname)"],
    );
    let status_before = git_out(&repo, &["status", "--porcelain", "--untracked-files=all"]);
    let head_before = git_out(&repo, &["symbolic-ref", "HEAD"]);

    let daemon = daemon(dir.path(), TUNING, "");
    let id = daemon.submit(&json!({
        "profile": "balanced",
        "task": "change things",
        "repo": repo.display().to_string(),
        "result_branch": true,
        "start": "cold",
        "command": "printf 'new file\\n' > added.txt && git add added.txt && \
                    git -c user.name=agent -c user.email=agent@example.invalid commit -q -m 'add added.txt' && \
                    printf 'edited by the agent\\n' >> hello.txt && echo changes-made",
    }));
    let job = daemon.wait_terminal(&id, Duration::from_secs(240));
    assert_eq!(job["status"], "COMPLETED", "{job}\n{}", daemon.log());
    assert_eq!(job["result_branch"], true);
    let branch = format!("agentlab/{id}");
    assert_eq!(
        job["changes"],
        json!({"commits": 2, "files": 2, "insertions": 2, "deletions": 0, "branch": branch}),
        "{job}"
    );

    // The branch holds the agent's commit and the runner's commit of the uncommitted edit.
    let subjects = git_out(&repo, &["log", "--format=%s", &format!("main..{branch}")]);
    assert_eq!(
        subjects,
        format!("Uncommitted changes left by job {id}\nadd added.txt")
    );
    assert_eq!(
        git_out(&repo, &["show", &format!("{branch}:hello.txt")]),
        "hello from the host repo\nedited by the agent"
    );
    assert_eq!(
        git_out(&repo, &["show", &format!("{branch}:added.txt")]),
        "new file"
    );
    // Nothing else in the host repo changed: refs (but the new branch), HEAD, work tree.
    let refs_after = git_out(
        &repo,
        &["for-each-ref", "--format=%(refname) %(objectname)"],
    );
    let mut expected: Vec<String> = refs_before.lines().map(str::to_owned).collect();
    expected.push(format!(
        "refs/heads/{branch} {}",
        git_out(&repo, &["rev-parse", &branch])
    ));
    expected.sort();
    let mut got: Vec<String> = refs_after.lines().map(str::to_owned).collect();
    got.sort();
    assert_eq!(got, expected);
    assert_eq!(git_out(&repo, &["symbolic-ref", "HEAD"]), head_before);
    assert_eq!(
        git_out(&repo, &["status", "--porcelain", "--untracked-files=all"]),
        status_before
    );
    assert!(!repo.join(".git/FETCH_HEAD").exists());
    // A cold boot's verdict is read through the guest agent once it answers.
    assert_eq!(
        cloud_init_events(&daemon, &id),
        ["cloud-init finished without errors (DataSourceNoCloud [seed=/dev/vdb])"]
    );

    // The bundle is kept as an artifact, and the diff shows both changes.
    let (_, listing) = daemon.get(&format!("/v1/jobs/{id}/artifacts"));
    assert_eq!(
        listing["artifacts"][0]["path"], ".agentlab/result.bundle",
        "{listing}"
    );
    let patch = String::from_utf8(daemon.get_bytes(&format!("/v1/jobs/{id}/diff"))).unwrap();
    assert!(
        patch.contains("Subject: [PATCH 1/2] add added.txt"),
        "{patch}"
    );
    assert!(patch.contains("+new file"), "{patch}");
    assert!(patch.contains("+edited by the agent"), "{patch}");
    assert_nothing_left(dir.path());
}

/// The figure of the result-branch issue: the round trip of a 10 MB change (the runner's commit
/// and bundle in the guest, the upload, the daemon's read and fetch into the host repository),
/// against a job that changes nothing, side by side in one daemon.
#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn result_branch_figures() {
    let runs: usize = std::env::var("FIGURE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let repo = git_repo(dir.path());
    let daemon = daemon(dir.path(), TUNING, "");
    let at = |events: &Value, kind: &str, text: &str| -> f64 {
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == kind && e["message"].as_str().unwrap().contains(text))
            .map(|e| e["at_ms"].as_f64().unwrap())
            .unwrap_or_else(|| panic!("no {kind} event with {text}: {events}"))
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    /// One kind of job's samples: guest part, host part, upload phase.
    type Samples = (Vec<f64>, Vec<f64>, Vec<f64>);
    let mut rows: Vec<(&str, Samples)> = vec![
        ("10 MB change", Samples::default()),
        ("no change", Samples::default()),
    ];
    for _ in 0..runs {
        for (name, (guest, host, upload)) in rows.iter_mut() {
            let command = if *name == "no change" {
                "true"
            } else {
                "head -c 10485760 /dev/urandom > big.bin"
            };
            let id = daemon.submit(&json!({
                "profile": "balanced", "task": "t", "repo": repo.display().to_string(),
                "result_branch": true, "command": command,
            }));
            let job = daemon.wait_terminal(&id, Duration::from_secs(300));
            assert_eq!(job["status"], "COMPLETED", "{job}");
            let (_, events) = daemon.get(&format!("/v1/jobs/{id}/events"));
            let exited = at(&events, "guest", "command exited");
            let done = at(&events, "guest", "uploads done");
            let changes = at(&events, "changes", "");
            guest.push((done - exited) / 1000.0);
            host.push((changes - done) / 1000.0);
            let phase = job["phases"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["phase"] == "upload")
                .unwrap()["duration_seconds"]
                .as_f64()
                .unwrap();
            upload.push(phase);
        }
    }
    println!("result branch round trip, {runs} jobs each, medians in seconds");
    println!(
        "{:<14} {:>22} {:>22} {:>14}",
        "job", "exit -> uploads done", "uploads done -> branch", "upload phase"
    );
    for (name, (guest, host, upload)) in rows {
        println!(
            "{name:<14} {:>22.2} {:>22.2} {:>14.2}",
            median(guest),
            median(host),
            median(upload)
        );
    }
}

/// The daemon on `images`, serving the runner at `runner`.
fn daemon_on(dir: &Path, images: &Path, runner: &Path) -> Daemon {
    let extra = format!("runner_path: {}\n", runner.display());
    daemon_with_images(dir, TUNING, images, &extra)
}

#[test]
fn a_template_without_a_runner_gets_the_daemons_cold_and_through_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let images = runnerless_images(dir.path());
    let runner = stripped_runner(dir.path());
    let daemon = daemon_on(dir.path(), &images, &runner);
    for start in ["cold", "auto"] {
        let id = daemon.submit(&json!({
            "profile": "balanced", "task": "t", "start": start,
            "command": "agentlab-runner --version; echo ran-with-the-daemons-runner",
        }));
        let job = daemon.wait_terminal(&id, Duration::from_secs(300));
        assert_eq!(
            job["status"],
            "COMPLETED",
            "{start}: {job}\n{}",
            daemon.log()
        );
        let output = daemon.job_log(&id);
        assert!(output.contains("ran-with-the-daemons-runner"), "{output}");
        assert_eq!(
            cloud_init_events(&daemon, &id)
                .iter()
                .filter(|e| e.contains("reported"))
                .count(),
            0,
            "{start}"
        );
    }
    // The cold boot and the snapshot's template VM each fetched it.
    assert!(
        daemon.log().matches("a guest fetched the runner").count() >= 2,
        "{}",
        daemon.log()
    );
    assert_nothing_left(dir.path());
}

#[test]
fn a_runner_whose_sha256_is_not_the_one_in_the_user_data_is_refused_by_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let images = runnerless_images(dir.path());
    let runner = stripped_runner(dir.path());
    let daemon = daemon_on(dir.path(), &images, &runner);
    // Replaced under the daemon: it serves these bytes, but the user-data names the digest it
    // read at start-up.
    let mut tampered = std::fs::read(&runner).unwrap();
    tampered.extend_from_slice(b"tampered");
    std::fs::write(&runner, tampered).unwrap();
    let id = daemon.submit(&json!({
        "profile": "balanced", "task": "t", "start": "cold", "command": "echo should-not-run",
    }));
    let job = daemon.wait_terminal(&id, Duration::from_secs(300));
    assert_eq!(job["status"], "FAILED", "{job}");
    assert!(!daemon.job_log(&id).contains("should-not-run"));
    let verdict = cloud_init_events(&daemon, &id);
    assert_eq!(verdict.len(), 1, "{verdict:?}");
    assert!(
        verdict[0].contains("cloud-init reported 1 error"),
        "{verdict:?}"
    );
    let (_, status) = daemon.get("/v1/status");
    assert_eq!(
        status["templates"][0]["errors"].as_array().unwrap().len(),
        1,
        "{status}"
    );
    assert!(daemon.log().contains("a guest fetched the runner"));
    assert_nothing_left(dir.path());
}
