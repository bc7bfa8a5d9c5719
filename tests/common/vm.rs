//! What the tests that boot real VMs share: the guest template, a host git repository to work on,
//! and the qemu processes left running.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use super::daemon::repo_dir;

pub fn images() -> PathBuf {
    let dir = std::env::var_os("AGENTLAB_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_dir().join("target/guest-image/images"));
    assert!(
        dir.join("root.qcow2").exists(),
        "no guest template in {}: build it with \
         `AGENTLAB_DATA_DIR=target/guest-image scripts/build-guest-image.sh --runner target/debug/agentlab-runner` \
         (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// A small git repository on the host, as a job's `repo`.
pub fn git_repo(dir: &Path) -> PathBuf {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("hello.txt"), "hello from the host repo\n").unwrap();
    super::git(&repo, &["init", "-q", "-b", "main"]);
    super::git(&repo, &["add", "."]);
    super::git(&repo, &["commit", "-q", "-m", "initial"]);
    repo
}

/// qemu processes whose command line mentions `needle` (a test's folder, say).
pub fn qemu_processes(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains("qemu-system") && text.contains(needle) {
                found.push(text);
            }
        }
    }
    found
}

/// Cuts a snapshot file to `numerator/denominator` of its length, as a crash or a full disk
/// could; the files a snapshot never rewrites are read-only, so it is made writable first.
pub fn truncate_file(path: &Path, numerator: u64, denominator: u64) {
    use std::os::unix::fs::PermissionsExt;
    let length = std::fs::metadata(path).unwrap().len();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(length * numerator / denominator)
        .unwrap();
}

/// A port nothing listens on now, for a daemon whose guest port must stay the same across its
/// restarts (running VMs forward to it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// After a test's daemon is done with `dir` (its data folder `dir/data`): no qemu naming the
/// folder, no sandbox folder, and no snapshot being made.
pub fn assert_nothing_left(dir: &Path) {
    let needle = dir.display().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !qemu_processes(&needle).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        qemu_processes(&needle).is_empty(),
        "qemu left running: {:?}",
        qemu_processes(&needle)
    );
    let entries = |folder: &str| -> Vec<PathBuf> {
        std::fs::read_dir(dir.join("data").join(folder))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let left = entries("sandboxes");
    assert!(left.is_empty(), "sandbox files left: {left:?}");
    let makings: Vec<PathBuf> = entries("snapshots")
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".building"))
        .collect();
    assert!(makings.is_empty(), "snapshot makings left: {makings:?}");
}

/// The artifact at `path` in a `GET /v1/jobs/{id}/artifacts` listing (a job of a host repository
/// that leaves files in its checkout has the result bundle beside its own artifacts).
pub fn artifact_at<'a>(listing: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    listing["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["path"] == path)
        .unwrap_or_else(|| panic!("no artifact {path}: {listing}"))
}

/// An images folder whose default template is the test template with its runner removed
/// (`debugfs` on a raw copy of its root file system), the kernel, initrd and manifest shared.
pub fn runnerless_images(dir: &Path) -> PathBuf {
    let variant = dir.join("images");
    std::fs::create_dir_all(&variant).unwrap();
    let source = images();
    for file in ["vmlinuz", "initrd.img", "manifest.json"] {
        std::os::unix::fs::symlink(
            source.join(file).canonicalize().unwrap(),
            variant.join(file),
        )
        .unwrap();
    }
    let raw = dir.join("root.raw");
    let run = |program: &str, args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(program)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{program} {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let root = source.join("root.qcow2").canonicalize().unwrap();
    run(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            root.as_os_str(),
            raw.as_os_str(),
        ],
    );
    run(
        "debugfs",
        &[
            "-w".as_ref(),
            "-R".as_ref(),
            "rm /usr/local/bin/agentlab-runner".as_ref(),
            raw.as_os_str(),
        ],
    );
    let listing = run(
        "debugfs",
        &["-R".as_ref(), "ls /usr/local/bin".as_ref(), raw.as_os_str()],
    );
    assert!(!listing.contains("agentlab-runner"), "{listing}");
    let qcow2 = variant.join("root.qcow2");
    run(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            raw.as_os_str(),
            qcow2.as_os_str(),
        ],
    );
    std::fs::remove_file(&raw).unwrap();
    variant
}

/// The runner without its debug information (a debug build's is 20 times larger), in `dir`.
pub fn stripped_runner(dir: &Path) -> PathBuf {
    let runner = dir.join("agentlab-runner");
    let out = std::process::Command::new("strip")
        .arg("-o")
        .arg(&runner)
        .arg(env!("CARGO_BIN_EXE_agentlab-runner"))
        .output()
        .unwrap();
    assert!(out.status.success(), "strip: {out:?}");
    runner
}

/// Phase timeouts for guests that boot with systemd and Python cloud-init under TCG (tens of
/// seconds, not a few); the clone phase of a first snapshot start boots the template VM too.
pub const SLOW_GUEST_TUNING: &str =
    "phase_timeouts: {clone: 600s, start: 120s, cloud_init: 420s, guest_agent: 240s, \
     run: 300s, upload: 120s, destroy: 60s}\n\
     intervals: {guest_poll: 500ms, reconcile: 5s}\n\
     governor: {budget: {disk_min_free_percent: null}, boot_cap: {initial: 1}}\n";

/// The value of a job output's line `key=value`.
pub fn output_value<'a>(log: &'a str, key: &str) -> &'a str {
    log.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {log}"))
        .trim()
}
