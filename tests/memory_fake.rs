//! The real agentlabd binary on the fake backend with a set memory measurement: the governor and
//! status routes, and `agentlab status`, set the memory live sandboxes are committed against what
//! the backend measures them holding.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

#[test]
fn the_governor_route_carries_committed_memory_and_measured_pss() {
    let dir = tempfile::tempdir().unwrap();
    // Each running fake VM holds 300 MB PSS (900 MB RSS); the command runs ten minutes.
    let fake = format!(
        "fake:\n  memory: {{pss_bytes: {}, rss_bytes: {}}}\n  latency:\n    \
         run: {{min_ms: 600000, max_ms: 600000}}\n",
        300 * MIB,
        900 * MIB
    );
    let daemon = Daemon::start(dir.path(), "fake", &fake);
    let id = daemon.submit(&json!({"profile": "balanced", "task": "x"}));
    daemon.wait_phase(&id, "run", Duration::from_secs(30));

    let answer = daemon.get("/v1/governor").1;
    let memory = &answer["memory"];
    let committed_mb = answer["committed"]["memory_mb"].as_u64().unwrap();
    assert!(committed_mb > 0, "{answer}");
    assert_eq!(
        memory["committed_mb"].as_u64(),
        Some(committed_mb),
        "{memory}"
    );
    assert_eq!(memory["measured"], 1, "{memory}");
    assert_eq!(memory["pss_bytes"].as_u64(), Some(300 * MIB), "{memory}");
    assert_eq!(memory["rss_bytes"].as_u64(), Some(900 * MIB), "{memory}");
    let sandboxes = memory["sandboxes"].as_array().unwrap();
    assert_eq!(sandboxes.len(), 1, "{memory}");
    assert_eq!(
        sandboxes[0]["vm"],
        agentlab::model::sandbox_name_for(&id).as_str(),
        "{memory}"
    );
    assert_eq!(sandboxes[0]["committed_mb"].as_u64(), Some(committed_mb));
    assert_eq!(sandboxes[0]["booting"], false, "in its run phase");
    assert_eq!(sandboxes[0]["pss_bytes"].as_u64(), Some(300 * MIB));

    let status = daemon.get("/v1/status").1;
    assert_eq!(
        status["governor"]["memory"]["pss_bytes"].as_u64(),
        Some(300 * MIB),
        "{status}"
    );

    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_agentlab"))
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&cli.stdout);
    let want = format!(
        "sandbox memory: {committed_mb} MB committed to 1; really holding 300 MB PSS (900 MB RSS)"
    );
    assert!(text.contains(&want), "missing {want:?} in\n{text}");

    let (code, _) = daemon.post_json(&format!("/v1/jobs/{id}/cancel"), &Value::Null);
    assert!(code < 300, "cancel answered {code}");
}
