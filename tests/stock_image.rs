//! A stock cloud image as a template, end to end with real VMs: a whole-disk qcow2 with a
//! partition table, GRUB, and Debian's own kernel and initramfs inside (made from Debian packages
//! by scripts/build-disk-image.sh, in the layout of the official cloud images, with no runner of
//! its own) is imported with `agentlab template import`, and the daemon runs a job in it booted
//! by firmware, cold, then one restored from its snapshot. The guest fetches the daemon's runner.
//! An image without a partition table is refused with the reason.
//!
//! `AGENTLAB_TEST_DISK_IMAGE` is the image (default
//! `target/guest-image/disk-images/debian-12-disk.qcow2`, where scripts/test.sh builds it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::daemon::{repo_dir, repo_roots, Daemon};
use common::vm::{
    assert_nothing_left, git_repo, images, output_value, stripped_runner, SLOW_GUEST_TUNING,
};
use serde_json::{json, Value};

const TEMPLATE: &str = "debian-stock";

const PROFILE: &str = "name: stock\n\
     description: an imported whole-disk image, booted by firmware\n\
     template_vmid: 9000\n\
     image: debian-stock\n\
     resources: {cores: 1, memory_mb: 1024}\n\
     storage: {root_size_gb: 8, storage: local}\n\
     network: {mode: restricted, bridge: vmbr1}\n\
     ttl_minutes: 60\n\
     keepalive: false\n\
     agent: {command: \"true\"}\n";

/// What the guest shows of its boot: cloud-init's verdict, its name, the command line its boot
/// loader gave the kernel, and where its runner came from.
const COMMAND: &str = "cloud-init status --wait; \
     echo \"hostname=$(hostname)\"; \
     echo \"cmdline=$(cat /proc/cmdline)\"; \
     echo \"root=$(findmnt -n -o SOURCE /)\"; \
     cat hello.txt";

fn disk_image() -> PathBuf {
    let image = std::env::var_os("AGENTLAB_TEST_DISK_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_dir().join("target/guest-image/disk-images/debian-12-disk.qcow2"));
    assert!(
        image.exists(),
        "no disk image at {}: build it with `AGENTLAB_DATA_DIR=target/guest-image \
         scripts/build-disk-image.sh` (scripts/test.sh does)",
        image.display()
    );
    image
}

fn daemon(dir: &Path) -> Daemon {
    std::fs::create_dir_all(dir.join("tuning")).unwrap();
    std::fs::write(dir.join("tuning/default.yaml"), SLOW_GUEST_TUNING).unwrap();
    std::fs::create_dir_all(dir.join("profiles")).unwrap();
    std::fs::write(dir.join("profiles/stock.yaml"), PROFILE).unwrap();
    let extra = format!(
        "{roots}profiles_dir: {profiles}\nrunner_path: {runner}\nqemu:\n  accel: tcg\n  \
         memory_mb_cap: 1024\n  cores_cap: 1\n  snapshot_boot_timeout: 600s\n",
        roots = repo_roots(&[dir]),
        profiles = dir.join("profiles").display(),
        runner = stripped_runner(dir).display(),
    );
    Daemon::start(dir, "qemu", &extra)
}

fn cli(daemon: &Daemon, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentlab"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .output()
        .unwrap()
}

fn assert_booted_by_its_own_loader(log: &str, job: &Value) {
    assert!(
        log.lines().any(|l| l.trim() == "status: done"),
        "cloud-init did not finish cleanly: {log}"
    );
    assert!(log.contains("hello from the host repo"), "{log}");
    // GRUB names the kernel it loaded; QEMU's -kernel does not.
    assert!(
        output_value(log, "cmdline").contains("BOOT_IMAGE="),
        "{log}"
    );
    // The root file system is a partition of the disk, not the whole device.
    assert!(output_value(log, "root").starts_with("/dev/vda"), "{log}");
    assert_ne!(output_value(log, "root"), "/dev/vda", "{log}");
    let sandbox = job["sandbox_id"].as_str().unwrap_or_default();
    assert_eq!(output_value(log, "hostname"), sandbox, "{job}\n{log}");
}

#[test]
fn a_whole_disk_image_is_imported_and_runs_jobs_booted_by_firmware_cold_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let repo = git_repo(dir.path());
    let daemon = daemon(dir.path());
    let image = disk_image();

    // An image without a partition table is refused, and nothing is registered.
    let busybox_root = images().join("root.qcow2");
    let refused = cli(
        &daemon,
        &[
            "template",
            "import",
            busybox_root.to_str().unwrap(),
            "whole-fs",
        ],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("no partition table"), "{stderr}");
    assert!(!dir.path().join("data/images/whole-fs").exists());

    let imported = cli(
        &daemon,
        &["template", "import", image.to_str().unwrap(), TEMPLATE],
    );
    let stdout = String::from_utf8_lossy(&imported.stdout);
    assert!(
        imported.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&imported.stderr),
        daemon.log()
    );
    assert!(
        stdout.contains("boots by firmware: Debian GNU/Linux 12"),
        "{stdout}"
    );
    assert!(stdout.contains("boot loader GRUB"), "{stdout}");
    assert!(
        stdout.contains("cloud-init: /usr/bin/cloud-init"),
        "{stdout}"
    );
    assert!(
        stdout.contains("qemu-guest-agent: /usr/sbin/qemu-ga"),
        "{stdout}"
    );
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(
            dir.path()
                .join(format!("data/images/{TEMPLATE}/manifest.json")),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["boot"], "firmware", "{manifest}");

    let submit = |start: &str| {
        daemon.submit(&json!({
            "profile": "stock",
            "task": "boot check",
            "repo": repo.display().to_string(),
            "command": COMMAND,
            "start": start,
        }))
    };
    let cold = submit("cold");
    let job = daemon.wait_terminal(&cold, Duration::from_secs(900));
    assert_eq!(job["status"], "COMPLETED", "{job}\n{}", daemon.log());
    assert_eq!(job["start_method"], "cold", "{job}");
    assert_booted_by_its_own_loader(&daemon.job_log(&cold), &job);
    let verdicts = daemon.event_messages(&cold, "cloud-init");
    assert!(
        verdicts
            .first()
            .is_some_and(|v| v.starts_with("cloud-init finished without errors")),
        "{verdicts:?}"
    );
    // The image has no runner: the guest fetched the daemon's.
    assert!(
        daemon.log().contains("a guest fetched the runner"),
        "{}",
        daemon.log()
    );

    let restored = submit("snapshot");
    let job = daemon.wait_terminal(&restored, Duration::from_secs(1200));
    assert_eq!(job["status"], "COMPLETED", "{job}\n{}", daemon.log());
    assert_eq!(job["start_method"], "restored", "{job}");
    assert_booted_by_its_own_loader(&daemon.job_log(&restored), &job);

    assert_nothing_left(dir.path());
}
