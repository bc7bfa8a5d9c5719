//! Unit tests' git: runs git in a folder with a fixed committer and returns its trimmed stdout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}
