//! The real agentlabd binary on the fake backend: API input handling, config errors, SIGHUP
//! reload, and recovery after SIGKILL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use serde_json::{json, Value};

fn error_code(answer: &Value) -> &str {
    answer["error"]["code"].as_str().unwrap_or("")
}

/// Fake backend config whose VMs survive in `state` and whose command runs ten minutes.
fn slow_fake(state: &std::path::Path) -> String {
    format!(
        "fake:\n  state_file: {}\n  latency:\n    run: {{min_ms: 600000, max_ms: 600000}}\n",
        state.display()
    )
}

/// The import route's own refusals; a real import is in tests/stock_image.rs.
#[test]
fn a_template_import_without_an_image_or_on_a_backend_without_templates_is_a_400() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "fake", "");
    let (status, answer) = daemon.post_raw("/v1/templates/stock", Vec::new());
    assert_eq!(
        (status, error_code(&answer)),
        (400, "bad_request"),
        "{answer}"
    );
    assert!(answer["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no image"));

    let (status, answer) = daemon.post_raw("/v1/templates/stock", vec![0; 4096]);
    assert_eq!(
        (status, error_code(&answer)),
        (400, "bad_request"),
        "{answer}"
    );
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("does not import templates"), "{message}");
    // The upload is gone once answered.
    let uploads = dir.path().join("data/uploads");
    let left: Vec<_> = std::fs::read_dir(&uploads).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn bad_api_input_gets_a_clear_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "fake", "");

    let (status, answer) = daemon.post_raw("/v1/jobs", b"{\"profile\": ".to_vec());
    assert_eq!(
        (status, error_code(&answer)),
        (400, "invalid_json"),
        "{answer}"
    );

    let (status, answer) = daemon.post_json("/v1/jobs", &json!({"profile": "nope", "task": "x"}));
    assert_eq!((status, error_code(&answer)), (400, "unknown_profile"));
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("balanced"),
        "lists the known profiles"
    );

    let (status, answer) = daemon.post_json(
        "/v1/jobs",
        &json!({"profile": "balanced", "task": "x", "colour": 1}),
    );
    assert_eq!((status, error_code(&answer)), (400, "invalid_json"));
    assert!(answer["error"]["message"]
        .as_str()
        .unwrap()
        .contains("colour"));

    let huge = json!({"profile": "balanced", "task": "x".repeat(2 * 1024 * 1024)});
    let (status, answer) = daemon.post_raw("/v1/jobs", serde_json::to_vec(&huge).unwrap());
    assert_eq!((status, error_code(&answer)), (413, "payload_too_large"));

    let (status, answer) = daemon.post_json(
        "/v1/jobs",
        &json!({"profile": "balanced", "task": "x", "repo": "/no/such/repo"}),
    );
    assert_eq!(
        (status, error_code(&answer)),
        (400, "bad_request"),
        "{answer}"
    );

    for path in [
        "/v1/jobs/0000",
        "/v1/jobs/0000/events",
        "/v1/jobs/0000/logs",
        "/v1/sandboxes/sandbox-x",
        "/v1/nothing",
    ] {
        let (status, answer) = daemon.get(path);
        assert_eq!(
            (status, error_code(&answer)),
            (404, "not_found"),
            "{path}: {answer}"
        );
    }
    let (status, _) = daemon.post_json("/v1/jobs/0000/cancel", &json!({}));
    assert_eq!(status, 404);
    let (status, answer) = daemon.get("/v1/jobs?status=SLEEPING");
    assert_eq!((status, error_code(&answer)), (400, "bad_request"));
}

#[test]
fn the_start_asked_for_is_checked_at_submit_and_shown_with_how_the_sandbox_started() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "fake", "");
    let job = |start: &str| json!({"profile": "balanced", "task": "x", "start": start});

    // The fake backend boots every sandbox cold: a snapshot start is refused, and says why.
    let (status, answer) = daemon.post_json("/v1/jobs", &job("snapshot"));
    assert_eq!(
        (status, error_code(&answer)),
        (400, "bad_request"),
        "{answer}"
    );
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("backend: qemu") && message.contains("`start: cold` or `auto`"),
        "{message}"
    );

    let (status, answer) = daemon.post_json("/v1/jobs", &job("bogus"));
    assert_eq!(
        (status, error_code(&answer)),
        (400, "invalid_json"),
        "{answer}"
    );
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`start` must be one of auto, cold, snapshot, not `bogus`"),
        "{message}"
    );

    let (_, listed) = daemon.get("/v1/jobs");
    assert!(
        listed["jobs"].as_array().unwrap().is_empty(),
        "a refused job is never queued: {listed}"
    );

    let (status, created) = daemon.post_json("/v1/jobs", &job("cold"));
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(daemon.job(&id)["start"], "cold");
    let done = daemon.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(done["status"], "COMPLETED", "{done}");
    // Auto is the default, and is shown as such.
    let auto = daemon.submit(&json!({"profile": "balanced", "task": "x"}));
    assert_eq!(daemon.job(&auto)["start"], "auto");

    // How the sandbox started, once recorded, is served with the job and the sandbox. Recorded
    // here by hand, as a backend that restores would have it (the fake one never does).
    let sandbox = done["sandbox_id"].as_str().unwrap().to_owned();
    let store = agentlab::store::Store::open(&dir.path().join("data/agentlab.db")).unwrap();
    store
        .set_sandbox_start(
            &sandbox,
            agentlab::model::StartMethod::Restored,
            Some("snap-balanced"),
        )
        .unwrap();
    let shown = daemon.job(&id);
    assert_eq!(
        (
            &shown["start"],
            &shown["start_method"],
            &shown["snapshot_id"]
        ),
        (&json!("cold"), &json!("restored"), &json!("snap-balanced")),
        "{shown}"
    );
    let (_, sandbox) = daemon.get(&format!("/v1/sandboxes/{sandbox}"));
    assert_eq!(sandbox["start_method"], "restored", "{sandbox}");
    assert_eq!(sandbox["snapshot_id"], "snap-balanced", "{sandbox}");
}

#[test]
fn a_job_runs_to_completion_and_its_history_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "fake", "");
    let id = daemon
        .submit(&json!({"profile": "balanced", "task": "x", "env": {"TOKEN": "hunter2-secret"}}));
    let job = daemon.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "COMPLETED", "{job}");
    assert_eq!(job["phases"].as_array().unwrap().len(), 7);
    assert!(
        !job.to_string().contains("hunter2-secret"),
        "env values must never be served"
    );
    let (_, events) = daemon.get(&format!("/v1/jobs/{id}/events"));
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"status"));
    assert_eq!(kinds.last(), Some(&"finished"));
    let (status, cancel) = daemon.post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}));
    assert_eq!((status, error_code(&cancel)), (409, "conflict"));
    let (_, sandboxes) = daemon.get("/v1/sandboxes?state=DESTROYED");
    assert_eq!(sandboxes["sandboxes"].as_array().unwrap().len(), 1);
    assert!(
        !daemon.log().contains("hunter2-secret"),
        "env values must never be logged"
    );
}

#[test]
fn a_bad_config_stops_start_up_naming_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "backend: fake\nprovisioning_timeout: whenever\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_agentlabd"))
        .args(["--check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr.contains(&config.display().to_string()) && stderr.contains("provisioning_timeout"),
        "{stderr}"
    );
}

#[test]
fn sighup_reloads_tuning_and_an_invalid_file_keeps_the_old_values() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "fake", "");
    let tuning = dir.path().join("tuning/default.yaml");
    let max = |d: &Daemon| d.get("/v1/status").1["max_concurrent"].as_u64().unwrap();
    assert_eq!(max(&daemon), 4);
    std::fs::write(&tuning, "admission: {max_concurrent: 7}\n").unwrap();
    daemon.signal("HUP");
    let wait_for = |want: u64| {
        for _ in 0..100 {
            if max(&daemon) == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("max_concurrent never became {want}");
    };
    wait_for(7);
    std::fs::write(&tuning, "admission: {max_concurrent: 0}\n").unwrap();
    daemon.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(max(&daemon), 7, "an invalid file must keep the old values");
    assert!(
        daemon.log().contains("admission.max_concurrent"),
        "the error names the key"
    );
}

#[test]
fn killed_mid_job_and_restarted_nothing_leaks_and_nothing_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("fake-vms.json");
    let slow = slow_fake(&state);
    let mut daemon = Daemon::start(dir.path(), "fake", &slow);
    let running = daemon.submit(&json!({"profile": "balanced", "task": "x"}));
    daemon.wait_phase(&running, "run", Duration::from_secs(30));
    let vms: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(vms.as_object().unwrap().len(), 1, "one VM exists mid-run");
    daemon.kill9();

    // Restart without the slow run; the reconciler must resume or clean up.
    let fast = format!("fake:\n  state_file: {}\n", state.display());
    let daemon = Daemon::start(dir.path(), "fake", &fast);
    let job = daemon.wait_terminal(&running, Duration::from_secs(30));
    assert!(
        ["FAILED", "COMPLETED"].contains(&job["status"].as_str().unwrap()),
        "{job}"
    );
    let vms: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert!(vms.as_object().unwrap().is_empty(), "leaked VMs: {vms}");
    let (_, open) = daemon.get("/v1/jobs?status=RUNNING");
    assert!(open["jobs"].as_array().unwrap().is_empty());
    let (_, sandboxes) = daemon.get("/v1/sandboxes");
    assert!(sandboxes["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["state"] == "DESTROYED"));
}

#[test]
fn sigterm_suspends_a_running_job_and_the_next_start_takes_it_up() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("fake-vms.json");
    let slow = slow_fake(&state);
    let mut daemon = Daemon::start(dir.path(), "fake", &slow);
    let id = daemon.submit(&json!({"profile": "balanced", "task": "x"}));
    daemon.wait_phase(&id, "run", Duration::from_secs(30));
    assert!(daemon.stop().success(), "{}", daemon.log());
    let daemon = Daemon::start(
        dir.path(),
        "fake",
        &format!("fake:\n  state_file: {}\n", state.display()),
    );
    let job = daemon.wait_terminal(&id, Duration::from_secs(30));
    assert!(job["restarts"] == 0 && job["status"] != "RUNNING", "{job}");
    let vms: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert!(vms.as_object().unwrap().is_empty());
}

#[test]
fn the_governor_shows_why_the_head_waits_and_a_reload_lets_it_through() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tuning")).unwrap();
    let tuning = dir.path().join("tuning/default.yaml");
    // No host has a petabyte of memory available: with no progress floor, that signal holds
    // every job (a static rule would fail it at once instead, as nothing runs).
    let strict = {
        let mut t: agentlab::config::tuning::Tuning =
            yaml_serde::from_str(&common::daemon::test_tuning()).unwrap();
        t.governor.progress_floor = 0;
        // Only that signal, whatever else loads the machine running the tests.
        t.governor.signals = agentlab::config::governor::Signals {
            cpu_pressure: None,
            io_pressure: None,
            io_stall: None,
            memory_pressure: None,
            memory_stall: None,
            iowait: None,
            memory_available_mb: Some(agentlab::config::governor::Threshold::new(1e12, 2e12)),
            load_per_core: None,
        };
        yaml_serde::to_string(&t).unwrap()
    };
    std::fs::write(&tuning, &strict).unwrap();
    let daemon = Daemon::start(dir.path(), "fake", "");
    let id = daemon.submit(&json!({"profile": "balanced", "task": "x"}));
    let governor = |d: &Daemon| d.get("/v1/governor").1;
    let mut answer = governor(&daemon);
    for _ in 0..100 {
        if answer["queue"]["waiting"]["reason"] == "memory" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        answer = governor(&daemon);
    }
    assert_eq!(answer["enabled"], true, "{answer}");
    assert_eq!(answer["queue"]["head"], id.as_str(), "{answer}");
    assert_eq!(answer["queue"]["length"], 1);
    assert_eq!(answer["queue"]["waiting"]["reason"], "memory", "{answer}");
    assert!(answer["queue"]["waiting"]["detail"]
        .as_str()
        .unwrap()
        .contains("available memory"));
    assert!(answer["readings"]["cpu"]["logical_cpus"].as_u64().unwrap() > 0);
    assert!(
        answer["readings"]["memory"]["total_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(answer["budgets"]["vcpus"].as_u64().unwrap() > 0);
    assert!(answer["sampled_at_ms"].as_i64().is_some());
    let source = answer["pressure_source"].as_str().unwrap();
    assert!(
        source == "psi" || source.starts_with("PSI unavailable"),
        "{source}"
    );
    assert!(answer["cost"]["samples"].as_u64().unwrap() >= 1);
    let job = daemon.job(&id);
    assert_eq!(job["queue_position"], 1);
    // The job itself says what it waits for.
    assert_eq!(job["queue"]["position"], 1, "{job}");
    assert_eq!(job["queue"]["reason"], "memory", "{job}");
    assert!(
        job["queue"]["waiting_for"]
            .as_str()
            .unwrap()
            .starts_with("memory: available memory"),
        "{job}"
    );
    assert_eq!(
        daemon.get("/v1/status").1["governor"]["queue"]["head"],
        id.as_str()
    );

    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_agentlab"))
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&cli.stdout);
    assert!(text.contains("governor:     on"), "{text}");
    assert!(text.contains(&format!("the head {id} waits")), "{text}");
    assert!(text.contains("for memory: available memory"), "{text}");

    std::fs::write(&tuning, common::daemon::test_tuning()).unwrap();
    daemon.signal("HUP");
    let job = daemon.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "COMPLETED", "{job}");
    assert!(governor(&daemon)["queue"]["waiting"].is_null());
}

#[test]
fn a_full_queue_answers_429_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tuning")).unwrap();
    // One job runs (for ten minutes) in the only slot, one waits behind it: the queue is full.
    let tuning = common::daemon::test_tuning()
        .replace("queue_max: 1000", "queue_max: 1")
        .replace("max_concurrent: 4", "max_concurrent: 1");
    assert!(tuning.contains("max_concurrent: 1\n"), "{tuning}");
    std::fs::write(dir.path().join("tuning/default.yaml"), tuning).unwrap();
    let state = dir.path().join("fake-vms.json");
    let daemon = Daemon::start(dir.path(), "fake", &slow_fake(&state));
    let running = daemon.submit(&json!({"profile": "balanced", "task": "x"}));
    daemon.wait_phase(&running, "run", Duration::from_secs(30));
    daemon.submit(&json!({"profile": "balanced", "task": "x"}));
    let (status, answer) =
        daemon.post_json("/v1/jobs", &json!({"profile": "balanced", "task": "y"}));
    assert_eq!(
        (status, error_code(&answer)),
        (429, "queue_full"),
        "{answer}"
    );
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the queue is full: 1 job waiting")
            && message.contains("admission.queue_max"),
        "{message}"
    );
}

fn cli(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_agentlab"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .output()
        .unwrap()
}

fn now_ms() -> i64 {
    agentlab::model::now_ms()
}

#[test]
fn a_kept_sandbox_lease_is_renewed_and_anything_else_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "fake", "");
    // One after the other: a kept sandbox holds its share of the host (the governor counts it).
    let gone = daemon.submit(&json!({"profile": "balanced", "task": "x"}));
    daemon.wait_terminal(&gone, Duration::from_secs(30));
    let kept = daemon.submit(&json!({"profile": "interactive-dev", "task": "x"}));
    assert_eq!(
        daemon.wait_terminal(&kept, Duration::from_secs(30))["status"],
        "COMPLETED"
    );
    let kept_sb = agentlab::model::sandbox_name_for(&kept);
    let gone_sb = agentlab::model::sandbox_name_for(&gone);
    assert_eq!(
        daemon.get(&format!("/v1/sandboxes/{kept_sb}")).1["state"],
        "KEPT"
    );

    let before = now_ms();
    let (status, answer) = daemon.post_json(
        &format!("/v1/sandboxes/{kept_sb}/lease"),
        &json!({"ttl": "2h"}),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["ttl_seconds"], 7200);
    let until = answer["lease_expires_at_ms"].as_i64().unwrap();
    // The daemon's clock is wall time at start-up advanced by the monotonic clock, so it may sit a
    // few milliseconds off this process's wall clock (truncation, NTP slewing): allow a second.
    let slack = 1_000;
    assert!(
        until >= before + 7_200_000 - slack && until <= now_ms() + 7_200_000 + slack,
        "{answer}"
    );
    let (_, shown) = daemon.get(&format!("/v1/sandboxes/{kept_sb}"));
    assert_eq!(shown["lease_expires_at_ms"].as_i64(), Some(until));

    for (body, code) in [
        (json!({"ttl": "soon"}), "bad_request"),
        (json!({"ttl": "0s"}), "bad_request"),
        (json!({"ttl": "30days"}), "bad_request"),
        (json!({"ttl_minutes": 5}), "invalid_json"),
    ] {
        let (status, answer) = daemon.post_json(&format!("/v1/sandboxes/{kept_sb}/lease"), &body);
        assert_eq!(
            (status, error_code(&answer)),
            (400, code),
            "{body}: {answer}"
        );
    }
    let (status, answer) =
        daemon.post_json("/v1/sandboxes/sandbox-nope/lease", &json!({"ttl": "1h"}));
    assert_eq!(
        (status, error_code(&answer)),
        (404, "not_found"),
        "{answer}"
    );
    let (status, answer) = daemon.post_json(
        &format!("/v1/sandboxes/{gone_sb}/lease"),
        &json!({"ttl": "1h"}),
    );
    assert_eq!((status, error_code(&answer)), (409, "conflict"), "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("DESTROYED"),
        "{answer}"
    );

    // The CLI: human and JSON answers, and the lease in `sandbox show` only while KEPT.
    let out = cli(&daemon, &["sandbox", "renew", &kept_sb, "--ttl", "30m"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("sandbox {kept_sb} kept until"))
            && (text.contains("(in 29m)") || text.contains("(in 30m)")),
        "{text}"
    );
    let out = cli(
        &daemon,
        &["--json", "sandbox", "renew", &kept_sb, "--ttl", "1h"],
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["ttl_seconds"], 3600, "{answer}");
    let shown =
        String::from_utf8_lossy(&cli(&daemon, &["sandbox", "show", &kept_sb]).stdout).into_owned();
    assert!(
        shown.contains("lease:") && shown.contains("until"),
        "{shown}"
    );
    let shown =
        String::from_utf8_lossy(&cli(&daemon, &["sandbox", "show", &gone_sb]).stdout).into_owned();
    assert!(!shown.contains("lease:"), "{shown}");
    let out = cli(&daemon, &["sandbox", "renew", &gone_sb, "--ttl", "1h"]);
    assert_eq!(out.status.code(), Some(7), "an API error");
}

#[test]
fn a_renew_while_the_job_runs_waits_for_it_to_be_kept() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("fake-vms.json");
    let daemon = Daemon::start(dir.path(), "fake", &slow_fake(&state));
    // One at a time: the host running the tests may not fit both.
    let plain = daemon.submit(&json!({"profile": "balanced", "task": "x"}));
    daemon.wait_phase(&plain, "run", Duration::from_secs(30));
    let sandbox = agentlab::model::sandbox_name_for(&plain);
    let (status, answer) = daemon.post_json(
        &format!("/v1/sandboxes/{sandbox}/lease"),
        &json!({"ttl": "45m"}),
    );
    assert_eq!((status, error_code(&answer)), (409, "conflict"), "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("keepalive: false"),
        "{answer}"
    );
    let (status, _) = daemon.post_json(&format!("/v1/jobs/{plain}/cancel"), &json!({}));
    assert_eq!(status, 202);
    daemon.wait_terminal(&plain, Duration::from_secs(30));

    let keepalive = daemon.submit(&json!({"profile": "interactive-dev", "task": "x"}));
    daemon.wait_phase(&keepalive, "run", Duration::from_secs(30));
    let sandbox = agentlab::model::sandbox_name_for(&keepalive);
    let (status, answer) = daemon.post_json(
        &format!("/v1/sandboxes/{sandbox}/lease"),
        &json!({"ttl": "45m"}),
    );
    assert_eq!(status, 200, "{answer}");
    assert!(answer["lease_expires_at_ms"].is_null(), "{answer}");
    assert_eq!(answer["sandbox"]["state"], "RUNNING");
    let out = cli(&daemon, &["sandbox", "renew", &sandbox, "--ttl", "45m"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("its job still runs"), "{text}");
}

/// Follows `next` from the first page to the last; returns every id seen, in order.
fn every_page(daemon: &Daemon, path: &str, key: &str) -> (Vec<String>, usize) {
    let (mut ids, mut pages, mut after) = (Vec::new(), 0, None::<String>);
    loop {
        let url = match &after {
            Some(cursor) => format!("{path}&after={cursor}"),
            None => path.to_owned(),
        };
        let (status, page) = daemon.get(&url);
        assert_eq!(status, 200, "{url}: {page}");
        pages += 1;
        ids.extend(
            page[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|item| item["id"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => {
                assert!(page["next"].is_null(), "{page}");
                return (ids, pages);
            }
        }
    }
}

#[test]
fn lists_page_with_a_cursor_and_return_each_item_once() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), "fake", "");
    let submitted: Vec<String> = (0..5)
        .map(|_| daemon.submit(&json!({"profile": "balanced", "task": "x"})))
        .collect();
    for id in &submitted {
        daemon.wait_terminal(id, Duration::from_secs(30));
    }
    let (jobs, pages) = every_page(&daemon, "/v1/jobs?limit=2", "jobs");
    let newest_first: Vec<String> = submitted.iter().rev().cloned().collect();
    assert_eq!(jobs, newest_first);
    assert_eq!(pages, 3);
    let (one_page, pages) = every_page(&daemon, "/v1/jobs?limit=5&status=COMPLETED", "jobs");
    assert_eq!((one_page.len(), pages), (5, 1));

    let (mut sandboxes, _) = every_page(&daemon, "/v1/sandboxes?limit=2", "sandboxes");
    let mut expected: Vec<String> = submitted
        .iter()
        .map(|id| agentlab::model::sandbox_name_for(id))
        .collect();
    sandboxes.sort();
    expected.sort();
    assert_eq!(sandboxes, expected);

    for bad in [
        "/v1/jobs?limit=1001",
        "/v1/jobs?limit=0",
        "/v1/jobs?after=nonsense",
        "/v1/sandboxes?limit=5000",
        "/v1/sandboxes?after=j5",
    ] {
        let (status, answer) = daemon.get(bad);
        assert_eq!(
            (status, error_code(&answer)),
            (400, "bad_request"),
            "{bad}: {answer}"
        );
    }

    let out = cli(&daemon, &["job", "list", "--limit", "2"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        stdout.contains(&submitted[4]) && !stdout.contains(&submitted[2]),
        "{stdout}"
    );
    let cursor = stderr
        .trim()
        .strip_prefix("more: --after ")
        .unwrap_or_else(|| panic!("{stderr}"))
        .to_owned();
    let out = cli(
        &daemon,
        &["job", "list", "--limit", "10", "--after", &cursor],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        stdout.contains(&submitted[0]) && !stdout.contains(&submitted[4]),
        "{stdout}"
    );
    assert!(!stderr.contains("more:"), "{stderr}");
}

#[test]
fn status_shows_the_instance_id_and_the_foreign_vms_the_reconciler_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("fake-vms.json");
    // A daemon whose id is known, and VMs it finds at start-up: one of its own the store never
    // recorded, one of another daemon's, one with no owner at all.
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/instance-id"), "0199-ours\n").unwrap();
    let vms = json!({
        "sandbox-orphan0000": {"job_id": "j", "running": true, "owner": "0199-ours"},
        "sandbox-theirs0000": {"job_id": "j", "running": true, "owner": "0199-theirs"},
        "sandbox-byhand0000": {"job_id": "j", "running": false}
    });
    std::fs::write(&state, vms.to_string()).unwrap();
    let daemon = Daemon::start(
        dir.path(),
        "fake",
        &format!("fake:\n  state_file: {}\n", state.display()),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let (_, status) = daemon.get("/v1/status");
        if status["foreign_vms"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
        {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status["instance_id"], "0199-ours");
    assert_eq!(
        status["foreign_vms"],
        json!([
            {"name": "sandbox-byhand0000", "vm_ref": "fake:sandbox-byhand0000", "owner": null},
            {"name": "sandbox-theirs0000", "vm_ref": "fake:sandbox-theirs0000", "owner": "0199-theirs"}
        ])
    );
    let left: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let mut names: Vec<&String> = left.as_object().unwrap().keys().collect();
    names.sort();
    assert_eq!(names, ["sandbox-byhand0000", "sandbox-theirs0000"]);
    assert!(
        daemon.log().contains("did not make"),
        "foreign VMs are logged: {}",
        daemon.log()
    );
}

#[test]
fn scratch_left_by_a_crash_is_cleared_at_start_up_and_job_files_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let half_bundle = data.join("tmp/01half.git/objects/pack");
    let half_upload = data.join("artifacts/.tmp/01half");
    let kept_artifact = data.join("artifacts/01job/out/a.txt");
    let kept_log = data.join("logs/01job.log");
    for file in [&half_upload, &kept_artifact, &kept_log] {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, b"x").unwrap();
    }
    std::fs::create_dir_all(&half_bundle).unwrap();

    let _daemon = Daemon::start(dir.path(), "fake", "");
    assert!(!data.join("tmp/01half.git").exists(), "half-made bundle");
    assert!(!half_upload.exists(), "half-written upload");
    assert_eq!(std::fs::read(&kept_artifact).unwrap(), b"x");
    assert_eq!(std::fs::read(&kept_log).unwrap(), b"x");
}

#[test]
fn cloud_inits_errors_become_a_job_event_and_mark_the_template_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let config = "fake:\n  cloud_init_errors: [\"('locale', ProcessExecutionError('locale-gen failed'))\"]\n";
    let daemon = Daemon::start(dir.path(), "fake", config);
    let id = daemon.submit(&json!({"profile": "balanced", "task": "x", "command": "true"}));
    let job = daemon.wait_terminal(&id, Duration::from_secs(60));
    // The job itself goes on: its guest did reach the daemon.
    assert_eq!(job["status"], "COMPLETED", "{job}");
    let cloud_init = daemon.event_messages(&id, "cloud-init");
    assert_eq!(
        cloud_init,
        [
            "cloud-init reported 1 error (DataSourceNoCloud [seed=fake]): \
          ('locale', ProcessExecutionError('locale-gen failed'))"
        ],
        "{cloud_init:?}"
    );
    let (_, status) = daemon.get("/v1/status");
    let templates = status["templates"].as_array().unwrap();
    assert_eq!(templates.len(), 1, "{status}");
    assert_eq!(templates[0]["job_id"], id.as_str());
    assert_eq!(
        templates[0]["errors"],
        json!(["('locale', ProcessExecutionError('locale-gen failed'))"])
    );
}
