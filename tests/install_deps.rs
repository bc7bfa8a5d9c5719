//! `scripts/install-deps.sh --check`: on this machine (where the install ran, as CI runs it before
//! the tests) it finds everything; on a machine that lacks one program it exits 1 and names the
//! program and the Debian package that brings it. The program list is the script's own: asked to
//! look in an empty folder, it names every program it wants.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-deps.sh")
}

/// Runs `install-deps.sh --check`, looking for programs only in `deps_path` if given.
fn check(deps_path: Option<&Path>) -> Output {
    let mut command = Command::new("bash");
    command.arg(script()).arg("--check");
    if let Some(path) = deps_path {
        command.env("AGENTLAB_DEPS_PATH", path);
    }
    command.output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The programs a `--check` run reports missing: its lines `  program NAME  (Debian package P)`.
fn missing_programs(report: &str) -> Vec<String> {
    report
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("program "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Where a program is, the way the script looks by default: PATH, then the sbin folders.
fn locate(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(program))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[test]
fn this_machine_has_everything() {
    let output = check(None);
    assert_eq!(
        output.status.code(),
        Some(0),
        "install-deps.sh --check on this machine (run scripts/install-deps.sh first):\n{}",
        stderr(&output)
    );
    assert!(stderr(&output).contains("ok: every program and file is present"));
}

#[test]
fn a_missing_qemu_img_is_named_with_its_package() {
    // An empty folder: the script names every program it looks for.
    let empty = tempfile::tempdir().unwrap();
    let output = check(Some(empty.path()));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let wanted = missing_programs(&stderr(&output));
    for program in [
        "qemu-img",
        "qemu-system-x86_64",
        "mkfs.vfat",
        "mcopy",
        "socat",
    ] {
        assert!(
            wanted.iter().any(|p| p == program),
            "{program} not in {wanted:?}"
        );
    }

    // Everything but qemu-img, linked from where this machine has it.
    let bin = tempfile::tempdir().unwrap();
    for program in wanted.iter().filter(|p| *p != "qemu-img") {
        let target = locate(program).unwrap_or_else(|| {
            panic!("{program} is not installed here (run scripts/install-deps.sh)")
        });
        std::os::unix::fs::symlink(target, bin.path().join(program)).unwrap();
    }
    let output = check(Some(bin.path()));
    let report = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert_eq!(missing_programs(&report), ["qemu-img"], "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.contains("program qemu-img") && l.contains("Debian package qemu-utils")),
        "{report}"
    );
    assert!(
        report.contains("install them with: apt-get install qemu-utils"),
        "{report}"
    );
}
