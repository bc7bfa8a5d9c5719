//! SIGHUP on the real daemon: the config file's `provisioning_timeout` is put in force with the
//! tuning and profiles, without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::daemon::Daemon;
use serde_json::json;

#[test]
fn sighup_puts_a_new_provisioning_timeout_in_force() {
    let dir = tempfile::tempdir().unwrap();
    // Guests take 5 s to boot; the provisioning budget starts at 10 minutes.
    let fake =
        "fake:\n  latency:\n    boot: {min_ms: 5000, max_ms: 5000}\nprovisioning_timeout: 10m\n";
    let daemon = Daemon::start(dir.path(), "fake", fake);
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(
        &daemon.config,
        config.replace("provisioning_timeout: 10m", "provisioning_timeout: 1s"),
    )
    .unwrap();
    daemon.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !daemon.log().contains("config reloaded") {
        assert!(Instant::now() < deadline, "no reload: {}", daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let id = daemon.submit(&json!({"profile": "balanced", "task": "x"}));
    let job = daemon.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "TIMEOUT", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("phase cloud_init timed out after 1s"),
        "{error}"
    );

    // A config the daemon cannot use keeps the values in force, and says why.
    std::fs::write(&daemon.config, "provisioning_timeout: soon\n").unwrap();
    daemon.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !daemon.log().contains("config not reloaded") {
        assert!(Instant::now() < deadline, "no error: {}", daemon.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        daemon.log().contains("provisioning_timeout"),
        "the error names the key"
    );
    let id = daemon.submit(&json!({"profile": "balanced", "task": "x"}));
    let job = daemon.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "TIMEOUT", "still 1s: {job}");
}
