//! The `agentlab` binary against a mock control API on a Unix socket: what it sends, what it
//! prints, and the exit codes scripts rely on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::mock::{serve_unix, MockServer, Request, Response};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn job_json(id: &str, status: &str, exit_code: Option<i32>) -> Value {
    let mut job = json!({
        "id": id, "profile": "small", "task": "t", "env_keys": ["A"], "artifacts": [],
        "status": status, "restarts": 0, "created_at_ms": 1_700_000_000_000_i64,
        "phases": [
            {"phase": "clone", "started_at_ms": 1_700_000_000_000_i64,
             "ended_at_ms": 1_700_000_001_500_i64, "duration_seconds": 1.5, "result": "ok"},
            {"phase": "run", "started_at_ms": 1_700_000_001_500_i64,
             "ended_at_ms": 1_700_000_004_000_i64, "duration_seconds": 2.5, "result": "ok"}
        ]
    });
    if status != "RUNNING" && status != "QUEUED" {
        job["finished_at_ms"] = json!(1_700_000_005_000_i64);
    }
    if let Some(code) = exit_code {
        job["exit_code"] = json!(code);
    }
    job
}

fn sse(events: &[(i64, Option<&str>, &str)]) -> Vec<(Duration, Vec<u8>)> {
    events
        .iter()
        .map(|(id, phase, message)| {
            let event = json!({
                "id": id, "job_id": "j1", "at_ms": 1_700_000_000_000_i64 + id * 1000,
                "kind": "phase", "phase": phase, "message": message
            });
            (
                Duration::from_millis(50),
                format!(": keep-alive\n\ndata: {event}\n\n").into_bytes(),
            )
        })
        .collect()
}

#[derive(Default)]
struct State {
    /// The status the job ends in, taken from the submitted task.
    final_status: String,
    events_requests: usize,
}

/// The mock daemon. The job ends with the status named by its task; the first events stream
/// breaks off early, as if the daemon restarted, so the CLI has to resume it.
fn daemon(socket: &Path) -> MockServer {
    let state = Arc::new(Mutex::new(State::default()));
    let good = b"good bytes".to_vec();
    serve_unix(socket, move |req: &Request| {
        let mut state = state.lock().unwrap();
        let path = req.path();
        match (req.method.as_str(), path.as_str()) {
            ("GET", "/v1/status") => Response::json(
                200,
                &json!({"version": "0.1.0", "backend": "fake", "uptime_seconds": 5,
                        "jobs": {"RUNNING": 1}, "sandboxes": {"RUNNING": 1},
                        "queue_length": 0, "shutting_down": false}),
            ),
            ("POST", "/v1/jobs") => {
                let body: Value = serde_json::from_slice(&req.body).unwrap();
                state.final_status = body["task"].as_str().unwrap().to_owned();
                Response::json(201, &json!({"id": "j1", "status": "QUEUED"}))
            }
            ("GET", "/v1/jobs/j1/events") => {
                state.events_requests += 1;
                if req.query().contains("after=2") {
                    Response::stream(
                        "text/event-stream",
                        sse(&[(3, Some("run"), "running"), (4, Some("destroy"), "")]),
                    )
                } else {
                    Response::stream(
                        "text/event-stream",
                        sse(&[(1, None, "queued"), (2, Some("clone"), "cloning")]),
                    )
                }
            }
            ("GET", "/v1/jobs/j1/logs") => {
                let offset: usize = req
                    .query()
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("offset="))
                    .map_or(0, |o| o.parse().unwrap());
                let log = b"hello\nworld\n";
                let parts = [&log[..6], &log[6..]]
                    .iter()
                    .scan(0, |at, part| {
                        let start = *at;
                        *at += part.len();
                        Some((start, *part))
                    })
                    .filter(|(start, part)| start + part.len() > offset)
                    .map(|(start, part)| {
                        let skip = offset.saturating_sub(start);
                        (Duration::from_millis(100), part[skip..].to_vec())
                    })
                    .collect();
                Response::stream("text/plain", parts)
            }
            ("GET", "/v1/jobs/j1") => {
                // Still running when the first events stream breaks off; over once the rest
                // of its events have been served.
                if state.events_requests < 2 || state.final_status.is_empty() {
                    Response::json(200, &job_json("j1", "RUNNING", None))
                } else {
                    let code = (state.final_status == "FAILED").then_some(2);
                    Response::json(200, &job_json("j1", &state.final_status.clone(), code))
                }
            }
            ("GET", "/v1/jobs/restored") => {
                let mut job = job_json("restored", "RUNNING", None);
                job["start"] = json!("auto");
                job["start_method"] = json!("restored");
                job["snapshot_id"] = json!("snap-2c-2048m");
                Response::json(200, &job)
            }
            ("POST", "/v1/jobs/j1/cancel") => {
                Response::error(409, "conflict", "job j1 is already COMPLETED")
            }
            ("GET", "/v1/jobs/j1/artifacts") => Response::json(
                200,
                &json!({"artifacts": [
                    {"job_id": "j1", "path": "out/good file.txt", "size": 10,
                     "sha256": hex::encode(Sha256::digest(&good)), "created_at_ms": 0},
                    {"job_id": "j1", "path": "out/tampered.txt", "size": 3,
                     "sha256": hex::encode(Sha256::digest(b"abc")), "created_at_ms": 0}
                ]}),
            ),
            ("GET", "/v1/jobs/j1/artifacts/out/good file.txt") => Response::new(200, good.clone())
                .header("x-sha256", &hex::encode(Sha256::digest(&good))),
            ("GET", "/v1/jobs/j1/artifacts/out/tampered.txt") => Response::new(200, "xyz"),
            _ => Response::error(404, "not_found", &format!("{path} does not exist")),
        }
    })
}

fn agentlab(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentlab"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("AGENTLAB_ENDPOINT")
        .env("SECRET_FROM_ENV", "from-the-env")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn status_prints_a_table_or_the_raw_json() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("d.sock");
    let _server = daemon(&socket);

    let out = agentlab(&socket, &["status"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("backend:      fake"), "{out:?}");

    let out = agentlab(&socket, &["status", "--json"]);
    let raw: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(raw["backend"], "fake");
}

#[test]
fn job_run_sends_the_request_and_prints_the_id() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("d.sock");
    let server = daemon(&socket);
    let repo = tmp.path().join("repo");
    std::fs::create_dir(&repo).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_agentlab"))
        .current_dir(tmp.path())
        .args([
            "--socket",
            socket.to_str().unwrap(),
            "job",
            "run",
            "--profile",
            "small",
        ])
        .args(["--task", "COMPLETED", "--repo", "repo", "--ref", "main"])
        .args([
            "--env",
            "A=1",
            "--env",
            "SECRET_FROM_ENV",
            "--artifact",
            "out/**",
        ])
        .args(["--run-timeout", "60"])
        .env("SECRET_FROM_ENV", "from-the-env")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(text(&out.stdout), "j1\n");

    let post = server
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    let body: Value = serde_json::from_slice(&post.body).unwrap();
    assert_eq!(
        body,
        json!({
            "profile": "small", "task": "COMPLETED",
            "repo": std::fs::canonicalize(&repo).unwrap().to_str().unwrap(),
            "ref": "main", "env": {"A": "1", "SECRET_FROM_ENV": "from-the-env"},
            "artifacts": ["out/**"], "run_timeout_seconds": 60
        })
    );
}

#[test]
fn job_run_sends_the_start_asked_for_and_refuses_an_unknown_one() {
    for (flag, sent) in [
        (Some("cold"), Some("cold")),
        (Some("snapshot"), Some("snapshot")),
        // auto is the default: the request means the same without it.
        (Some("auto"), None),
        (None, None),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("d.sock");
        let server = daemon(&socket);
        let mut args = vec!["job", "run", "--profile", "small", "--task", "COMPLETED"];
        if let Some(flag) = flag {
            args.extend(["--start", flag]);
        }
        let out = agentlab(&socket, &args);
        assert_eq!(out.status.code(), Some(0), "{flag:?}: {out:?}");
        let post = server
            .requests()
            .into_iter()
            .find(|r| r.method == "POST")
            .unwrap();
        let body: Value = serde_json::from_slice(&post.body).unwrap();
        assert_eq!(body.get("start").and_then(Value::as_str), sent, "{body}");
    }

    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("d.sock");
    let server = daemon(&socket);
    let out = agentlab(
        &socket,
        &[
            "job",
            "run",
            "--profile",
            "small",
            "--task",
            "t",
            "--start",
            "warm",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("warm") && stderr.contains("cold") && stderr.contains("snapshot"),
        "{stderr}"
    );
    assert!(
        server.requests().iter().all(|r| r.method != "POST"),
        "nothing is submitted"
    );
}

#[test]
fn job_show_prints_how_the_sandbox_started() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("d.sock");
    let _server = daemon(&socket);
    let out = agentlab(&socket, &["job", "show", "restored"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("start:        restored from snapshot snap-2c-2048m (asked: auto)\n"),
        "{stdout}"
    );
    let out = agentlab(&socket, &["job", "show", "j1"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("start:        auto\n"), "{stdout}");
}

#[test]
fn follow_streams_logs_resumes_events_and_exits_by_status() {
    for (status, code) in [
        ("COMPLETED", 0),
        ("FAILED", 1),
        ("TIMEOUT", 5),
        ("CANCELLED", 6),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("d.sock");
        let server = daemon(&socket);
        let out = agentlab(
            &socket,
            &[
                "job",
                "run",
                "--profile",
                "small",
                "--task",
                status,
                "--follow",
            ],
        );
        assert_eq!(out.status.code(), Some(code), "{status}: {out:?}");
        let stdout = text(&out.stdout);
        // Resumed at its offset, the log is not repeated.
        assert!(stdout.starts_with("hello\nworld\njob j1"), "{stdout}");
        assert!(stdout.contains(&format!("job j1 {status}")), "{stdout}");
        assert!(stdout.contains("clone  1.5s      ok"), "{stdout}");
        if status == "FAILED" {
            assert!(stdout.contains("exit code 2"), "{stdout}");
        }
        // Not a terminal: one plain line per phase, including those after the resume.
        let stderr = text(&out.stderr);
        assert!(stderr.contains("job j1 submitted"), "{stderr}");
        assert!(stderr.contains("] queued: queued\n"), "{stderr}");
        assert!(stderr.contains("] clone: cloning\n"), "{stderr}");
        assert!(stderr.contains("] run: running\n"), "{stderr}");
        assert!(stderr.contains("] destroy\n"), "{stderr}");
        let resumed = server
            .requests()
            .iter()
            .filter(|r| r.path() == "/v1/jobs/j1/events")
            .map(|r| r.query().to_owned())
            .collect::<Vec<_>>();
        assert_eq!(resumed, ["follow=1", "follow=1&after=2"]);
    }
}

#[test]
fn wait_with_json_prints_the_final_job() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("d.sock");
    let _server = daemon(&socket);
    let out = agentlab(
        &socket,
        &[
            "job",
            "run",
            "--profile",
            "small",
            "--task",
            "FAILED",
            "--wait",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["status"], "FAILED");
    assert_eq!(job["exit_code"], 2);
}

#[test]
fn follow_with_json_keeps_stdout_for_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("d.sock");
    let _server = daemon(&socket);
    let out = agentlab(
        &socket,
        &[
            "job",
            "run",
            "--profile",
            "small",
            "--task",
            "TIMEOUT",
            "--follow",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["status"], "TIMEOUT");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("hello\n") && stderr.contains("world\n"),
        "{stderr}"
    );
}

#[test]
fn api_errors_are_clear_and_map_to_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("d.sock");
    let _server = daemon(&socket);

    let out = agentlab(&socket, &["job", "show", "nope"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        text(&out.stderr),
        "agentlab: /v1/jobs/nope does not exist\n"
    );

    let out = agentlab(&socket, &["job", "cancel", "j1"]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(
        text(&out.stderr),
        "agentlab: agentlabd answered 409 (conflict): job j1 is already COMPLETED\n"
    );

    let out = agentlab(&tmp.path().join("absent.sock"), &["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("is agentlabd running?"),
        "{out:?}"
    );

    let out = agentlab(&socket, &["job", "list", "--status", "DONE"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn downloads_are_checked_against_their_digests() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("d.sock");
    let _server = daemon(&socket);
    let dir = tmp.path().join("dl");

    let out = agentlab(&socket, &["job", "artifacts", "j1"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stdout).contains("out/good file.txt  10"),
        "{out:?}"
    );

    let out = agentlab(
        &socket,
        &[
            "job",
            "artifacts",
            "j1",
            "--download",
            dir.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(
        std::fs::read(dir.join("out/good file.txt")).unwrap(),
        b"good bytes"
    );
    assert!(!dir.join("out/tampered.txt").exists());
    assert!(!dir.join("out/.tampered.txt.part").exists());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("out/tampered.txt: sha256 mismatch"),
        "{stderr}"
    );
    assert!(stderr.contains("1 of 2 artifacts failed"), "{stderr}");
}
