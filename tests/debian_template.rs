//! The Debian 12 agent template end to end, with real VMs: the daemon on the local QEMU backend
//! runs a job of the `debian-12` profile (`image: debian-12`) in a guest booted cold from the
//! template (`scripts/build-guest-image.sh --distro debian`), with real cloud-init and the agent
//! toolchain, then a second job restored from the template's snapshot.
//!
//! `AGENTLAB_TEST_DEBIAN_IMAGES` is the images folder holding `debian-12/` (default
//! `target/guest-image/images`, where scripts/test.sh builds it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::{repo_dir, repo_roots, Daemon};
use common::vm::{assert_nothing_left, git_repo, output_value, SLOW_GUEST_TUNING};
use serde_json::{json, Value};

const PROFILE: &str = "debian-12";

/// Prints what every job checks: cloud-init's own verdict, the tools' versions, units that
/// failed, where resolv.conf points.
const COMMAND: &str = "cloud-init status --wait; \
     echo \"hostname=$(hostname)\"; \
     git --version; python3 --version; echo \"node=$(node --version)\"; \
     gcc --version | head -n 1; cat hello.txt; \
     echo \"failed-units=$(systemctl --failed --no-legend --plain | awk '{print $1}' | tr '\\n' ' ')\"; \
     echo \"resolv=$(readlink /etc/resolv.conf)\"";

fn debian_images() -> PathBuf {
    let dir = std::env::var_os("AGENTLAB_TEST_DEBIAN_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_dir().join("target/guest-image/images"));
    assert!(
        dir.join(PROFILE).join("root.qcow2").exists(),
        "no Debian template in {}: build it with \
         `AGENTLAB_DATA_DIR=target/guest-image scripts/build-guest-image.sh --distro debian --runner target/debug/agentlab-runner` \
         (scripts/test.sh does)",
        dir.join(PROFILE).display()
    );
    dir
}

fn daemon(dir: &Path) -> Daemon {
    std::fs::create_dir_all(dir.join("tuning")).unwrap();
    std::fs::write(dir.join("tuning/default.yaml"), SLOW_GUEST_TUNING).unwrap();
    let qemu = format!(
        "{roots}qemu:\n  images_dir: {}\n  accel: tcg\n  memory_mb_cap: 1024\n  cores_cap: 1\n  \
         snapshot_boot_timeout: 600s\n",
        debian_images().display(),
        roots = repo_roots(&[dir]),
    );
    Daemon::start(dir, "qemu", &qemu)
}

/// What a job on the template must show, cold or restored.
fn assert_guest_output(log: &str, job: &Value) {
    assert!(
        log.lines().any(|l| l.trim() == "status: done"),
        "cloud-init did not finish cleanly: {log}"
    );
    assert!(log.contains("hello from the host repo"), "{log}");
    let has = |prefix: &str| log.lines().any(|l| l.starts_with(prefix));
    assert!(has("git version 2."), "no git version: {log}");
    assert!(has("Python 3."), "no python3 version: {log}");
    assert!(
        output_value(log, "node").starts_with('v'),
        "no node version: {log}"
    );
    assert!(has("gcc (Debian "), "no gcc version: {log}");
    assert_eq!(output_value(log, "failed-units"), "", "failed units: {log}");
    assert_eq!(
        output_value(log, "resolv"),
        "../run/systemd/resolve/resolv.conf",
        "{log}"
    );
    // The guest is the sandbox, under its own name (a restored one too).
    let sandbox = job["sandbox_id"].as_str().unwrap_or_default();
    assert!(!sandbox.is_empty(), "{job}");
    assert_eq!(output_value(log, "hostname"), sandbox, "{job}\n{log}");
}

#[test]
fn a_debian_job_runs_cold_with_real_cloud_init_then_restored_from_the_template_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let repo = git_repo(dir.path());
    let daemon = daemon(dir.path());
    let submit = |start: &str| {
        daemon.submit(&json!({
            "profile": PROFILE,
            "task": "toolchain check",
            "repo": repo.display().to_string(),
            "command": COMMAND,
            "start": start,
        }))
    };

    let cold = submit("cold");
    let job = daemon.wait_terminal(&cold, Duration::from_secs(900));
    assert_eq!(job["status"], "COMPLETED", "{job}\n{}", daemon.log());
    assert_eq!(job["exit_code"], 0, "{job}");
    assert_eq!(job["start_method"], "cold", "{job}");
    assert_guest_output(&daemon.job_log(&cold), &job);
    // The daemon read real cloud-init's verdict through the guest agent, and keeps it as the
    // template's.
    let verdicts = daemon.event_messages(&cold, "cloud-init");
    assert_eq!(verdicts.len(), 1, "{verdicts:?}");
    assert!(
        verdicts[0].starts_with("cloud-init finished without errors (DataSourceNoCloud"),
        "{verdicts:?}"
    );
    let (_, status) = daemon.get("/v1/status");
    assert_eq!(status["templates"][0]["template"], PROFILE, "{status}");
    assert_eq!(status["templates"][0]["errors"], json!([]), "{status}");

    // The first snapshot start makes the template's snapshot (a boot of its own), then restores.
    let restored = submit("snapshot");
    let job = daemon.wait_terminal(&restored, Duration::from_secs(1200));
    assert_eq!(job["status"], "COMPLETED", "{job}\n{}", daemon.log());
    assert_eq!(job["exit_code"], 0, "{job}");
    assert_eq!(job["start_method"], "restored", "{job}");
    assert!(
        job["snapshot_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{job}"
    );
    assert_guest_output(&daemon.job_log(&restored), &job);

    assert_nothing_left(dir.path());
}
