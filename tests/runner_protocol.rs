//! The runner against a mock of the guest API: the whole protocol, from the one-time bootstrap
//! to `done`, with a real git bundle and a real shell command.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentlab::runner::{self, ExecSettings, LogSettings, RetryPolicy, RunnerConfig};
use common::git;
use common::mock::{serve_tcp, serve_tcp_on, MockServer, Request, Response};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const BOOT_TOKEN: &str = "boot-token-0123456789";
const SESSION_TOKEN: &str = "session-token-abcdefghij";
const API_KEY: &str = "sk-live-abcdefghij";

/// A repository with one commit on `main`, bundled as the daemon would serve it.
fn make_bundle(tmp: &Path) -> Vec<u8> {
    let src = tmp.join("src");
    std::fs::create_dir(&src).unwrap();
    git(&src, &["init", "--quiet", "--initial-branch=main"]);
    std::fs::write(src.join("README.md"), "hello from the repo\n").unwrap();
    git(&src, &["add", "README.md"]);
    git(&src, &["commit", "--quiet", "-m", "first"]);
    let bundle = tmp.join("repo.bundle");
    git(
        &src,
        &[
            "bundle",
            "create",
            "--quiet",
            bundle.to_str().unwrap(),
            "--all",
        ],
    );
    std::fs::read(bundle).unwrap()
}

/// The mock guest API: hands out `spec` once for the bootstrap token, answers the first log
/// append with 503 (a daemon restarting), and stores artifacts with their digest.
fn guest_api(spec: Value, bundle: Vec<u8>) -> MockServer {
    guest_api_on(TcpListener::bind("127.0.0.1:0").unwrap(), spec, bundle)
}

fn guest_api_on(listener: TcpListener, spec: Value, bundle: Vec<u8>) -> MockServer {
    let bootstrapped = Arc::new(AtomicUsize::new(0));
    let logs_seen = Arc::new(AtomicUsize::new(0));
    serve_tcp_on(listener, move |req: &Request| {
        let path = req.path();
        if path == "/guest/v1/bootstrap" {
            if req.method != "POST" || req.bearer() != Some(BOOT_TOKEN) {
                return Response::error(401, "unauthorized", "bad bootstrap token");
            }
            if bootstrapped.fetch_add(1, Ordering::SeqCst) > 0 {
                return Response::error(401, "unauthorized", "bootstrap token already used");
            }
            return Response::json(200, &spec);
        }
        if req.bearer() != Some(SESSION_TOKEN) {
            return Response::error(401, "unauthorized", "bad session token");
        }
        match (req.method.as_str(), path.as_str()) {
            ("GET", "/guest/v1/repo.bundle") => Response::new(200, bundle.clone()),
            ("POST", "/guest/v1/log") => {
                if logs_seen.fetch_add(1, Ordering::SeqCst) == 0 {
                    Response::error(503, "shutting_down", "restarting")
                } else {
                    Response::empty(204)
                }
            }
            ("POST", "/guest/v1/exit") | ("POST", "/guest/v1/done") => Response::empty(204),
            ("PUT", p) if p.starts_with("/guest/v1/artifacts/") => {
                let rel = &p["/guest/v1/artifacts/".len()..];
                Response::json(
                    201,
                    &json!({
                        "job_id": "job-1", "path": rel, "size": req.body.len(),
                        "sha256": hex::encode(Sha256::digest(&req.body)), "created_at_ms": 0
                    }),
                )
            }
            _ => Response::error(404, "not_found", "no such route"),
        }
    })
}

fn config(tmp: &Path, url: &str) -> RunnerConfig {
    let bootstrap = tmp.join("bootstrap.json");
    std::fs::write(
        &bootstrap,
        json!({"url": url, "token": BOOT_TOKEN}).to_string(),
    )
    .unwrap();
    RunnerConfig {
        bootstrap_path: bootstrap,
        retry: RetryPolicy {
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
            budget: Duration::from_secs(10),
        },
        logs: LogSettings {
            flush_interval: Duration::from_millis(100),
            ..LogSettings::default()
        },
        exec: ExecSettings {
            kill_grace: Duration::from_millis(500),
            drain_grace: Duration::from_millis(500),
        },
    }
}

fn spec(workdir: &Path, command: &str, repo: Value, artifacts: &[&str]) -> Value {
    json!({
        "job_id": "job-1",
        "session_token": SESSION_TOKEN,
        "task": "fix the bug\nsecond line",
        "command": command,
        "repo": repo,
        "env": {"API_KEY": API_KEY, "SHORT": "abc"},
        "artifacts": artifacts,
        "run_timeout_seconds": 60,
        "max_artifact_bytes": 1000,
        "workdir": workdir,
    })
}

fn position(requests: &[Request], pred: impl Fn(&Request) -> bool) -> Vec<usize> {
    requests
        .iter()
        .enumerate()
        .filter(|(_, r)| pred(r))
        .map(|(i, _)| i)
        .collect()
}

fn log_text(requests: &[Request]) -> String {
    let mut bytes = Vec::new();
    let mut first_refused = false;
    for r in requests.iter().filter(|r| r.path() == "/guest/v1/log") {
        // The mock refused the first append; the runner sent the same bytes again.
        if !first_refused {
            first_refused = true;
            continue;
        }
        bytes.extend_from_slice(&r.body);
    }
    String::from_utf8(bytes).unwrap()
}

#[test]
fn runs_a_job_through_the_whole_guest_protocol() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = make_bundle(tmp.path());
    std::fs::write(tmp.path().join("outside.txt"), "not yours").unwrap();
    let workdir: PathBuf = tmp.path().join("guest/checkout/repo");
    let command = r#"
        cat README.md
        i=1; while [ $i -le 500 ]; do echo "line $i"; i=$((i+1)); done
        echo "key=$API_KEY short=$SHORT"
        rest=${API_KEY#?????}; head=${API_KEY%"$rest"}
        printf 'split=%s' "$head"; sleep 0.4; printf '%s\n' "$rest"
        read first; echo "stdin=$first"
        echo "job=$AGENTLAB_JOB_ID"
        echo to-stderr >&2
        mkdir -p out/sub
        printf hello > out/a.txt
        printf '\000\001\002' > "out/sub/b c.bin"
        head -c 2000 /dev/zero > out/big.bin
        ln -s ../../../../outside.txt out/escape.txt
        exit 3
    "#;
    let spec = spec(
        &workdir,
        command,
        json!({"kind": "bundle", "ref": "main"}),
        &["out/**", "../outside.txt", "missing/*"],
    );
    let server = guest_api(spec, bundle);

    let code = runner::run(&config(tmp.path(), &server.url)).unwrap();
    assert_eq!(code, 3, "the runner exits with the command's exit code");

    let requests = server.requests();
    // The one-time token is used once, for the bootstrap only; everything else carries the
    // session token.
    let boots = position(&requests, |r| r.bearer() == Some(BOOT_TOKEN));
    assert_eq!(boots, [0]);
    assert_eq!(requests[0].path(), "/guest/v1/bootstrap");
    assert!(requests[1..]
        .iter()
        .all(|r| r.bearer() == Some(SESSION_TOKEN)));
    assert_eq!(requests[1].path(), "/guest/v1/repo.bundle");

    // Output arrives in order, masked, including what was split across a pause.
    let log = log_text(&requests);
    assert!(
        log.starts_with("hello from the repo\nline 1\nline 2\n"),
        "{log}"
    );
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("line ")).collect();
    let expected: Vec<String> = (1..=500).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, expected);
    assert!(log.contains("key=*** short=abc\n"), "{log}");
    assert!(log.contains("split=***\n"), "{log}");
    assert!(log.contains("stdin=fix the bug\n"), "{log}");
    assert!(log.contains("job=job-1\n"), "{log}");
    assert!(log.contains("to-stderr\n"), "{log}");
    for secret in [API_KEY, "abcdefghij", BOOT_TOKEN, SESSION_TOKEN] {
        assert!(!log.contains(secret), "{secret} leaked: {log}");
    }

    // Then exit, then the artifacts, then done.
    let logs = position(&requests, |r| r.path() == "/guest/v1/log");
    let exits = position(&requests, |r| r.path() == "/guest/v1/exit");
    let puts = position(&requests, |r| r.method == "PUT");
    let dones = position(&requests, |r| r.path() == "/guest/v1/done");
    assert_eq!(exits.len(), 1);
    assert_eq!(dones.len(), 1);
    assert!(logs.iter().all(|l| *l < exits[0]));
    assert!(puts.iter().all(|p| *p > exits[0] && *p < dones[0]));
    let exit: Value = serde_json::from_slice(&requests[exits[0]].body).unwrap();
    assert_eq!(exit, json!({"exit_code": 3}));

    // The right bytes under the right names; nothing escaping the checkout, nothing too big.
    let mut uploaded: Vec<(String, Vec<u8>)> = puts
        .iter()
        .map(|i| (requests[*i].path(), requests[*i].body.clone()))
        .collect();
    uploaded.sort();
    assert_eq!(
        uploaded,
        [
            (
                "/guest/v1/artifacts/out/a.txt".to_owned(),
                b"hello".to_vec()
            ),
            (
                "/guest/v1/artifacts/out/sub/b c.bin".to_owned(),
                vec![0, 1, 2]
            ),
        ]
    );
    assert!(requests[puts[0]].target.contains("%20") || requests[puts[1]].target.contains("%20"));

    let done: Value = serde_json::from_slice(&requests[dones[0]].body).unwrap();
    assert_eq!(done["uploaded"], 2);
    let errors = done["errors"].to_string();
    assert!(errors.contains("out/big.bin skipped"), "{errors}");
    assert!(errors.contains("out/escape.txt skipped"), "{errors}");
    assert!(errors.contains("../outside.txt"), "{errors}");
    assert!(!errors.contains("not yours"));
}

#[test]
fn a_run_timeout_reports_124_and_still_finishes_the_protocol() {
    let tmp = tempfile::tempdir().unwrap();
    let workdir = tmp.path().join("work/empty");
    let mut spec = spec(
        &workdir,
        "echo start; touch made.txt; sleep 30",
        Value::Null,
        &["made.txt"],
    );
    spec["run_timeout_seconds"] = json!(1);
    let server = guest_api(spec, Vec::new());

    let started = std::time::Instant::now();
    let code = runner::run(&config(tmp.path(), &server.url)).unwrap();
    assert_eq!(code, 124);
    assert!(started.elapsed() < Duration::from_secs(15));

    let requests = server.requests();
    assert!(!requests.iter().any(|r| r.path() == "/guest/v1/repo.bundle"));
    let log = log_text(&requests);
    assert!(log.starts_with("start\n"), "{log}");
    assert!(log.contains("run timeout"), "{log}");
    let exit = requests
        .iter()
        .find(|r| r.path() == "/guest/v1/exit")
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&exit.body).unwrap(),
        json!({"exit_code": 124})
    );
    let put = requests.iter().find(|r| r.method == "PUT").unwrap();
    assert_eq!(put.path(), "/guest/v1/artifacts/made.txt");
    let done = requests.last().unwrap();
    assert_eq!(done.path(), "/guest/v1/done");
    assert_eq!(
        serde_json::from_slice::<Value>(&done.body).unwrap(),
        json!({"uploaded": 1, "errors": []})
    );
}

#[test]
fn a_refused_bootstrap_token_is_not_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let server = serve_tcp(|_| Response::error(401, "unauthorized", "token already used"));
    let err = runner::run(&config(tmp.path(), &server.url)).unwrap_err();
    assert!(err.to_string().contains("token already used"), "{err}");
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn a_failed_checkout_is_reported_and_nothing_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let workdir = tmp.path().join("work/repo");
    let spec = spec(
        &workdir,
        "touch ran.txt",
        json!({"kind": "bundle"}),
        &["**"],
    );
    // Not a bundle: the clone fails.
    let server = guest_api(spec, b"garbage".to_vec());
    let code = runner::run(&config(tmp.path(), &server.url)).unwrap();
    assert_eq!(code, runner::RUNNER_FAILURE_EXIT_CODE);
    let requests = server.requests();
    assert!(log_text(&requests).contains("cannot prepare the checkout"));
    let done: Value = serde_json::from_slice(&requests.last().unwrap().body).unwrap();
    assert_eq!(done["uploaded"], 0);
    assert!(done["errors"][0]
        .as_str()
        .unwrap()
        .contains("cannot prepare the checkout"));
    assert!(!workdir.join("ran.txt").exists());
}

#[test]
fn waits_for_a_daemon_that_is_not_up_yet() {
    let tmp = tempfile::tempdir().unwrap();
    let workdir = tmp.path().join("work/repo");
    let spec = spec(&workdir, "echo up", Value::Null, &[]);
    // Reserve a port, leave it closed for a while (connection refused), then serve on it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let server = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        guest_api_on(
            TcpListener::bind(("127.0.0.1", port)).unwrap(),
            spec,
            Vec::new(),
        )
    });
    let code = runner::run(&config(tmp.path(), &url)).unwrap();
    assert_eq!(code, 0);
    let requests = server.join().unwrap().requests();
    assert_eq!(requests[0].path(), "/guest/v1/bootstrap");
    assert_eq!(log_text(&requests), "up\n");
    assert_eq!(requests.last().unwrap().path(), "/guest/v1/done");
}

#[test]
fn an_artifact_the_daemon_stored_wrongly_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let workdir = tmp.path().join("work/repo");
    let spec = spec(
        &workdir,
        "printf data > out.txt; echo \"$API_KEY\" >&2",
        Value::Null,
        &["out.txt"],
    );
    let server = serve_tcp(move |req: &Request| match req.path().as_str() {
        "/guest/v1/bootstrap" => Response::json(200, &spec),
        p if p.starts_with("/guest/v1/artifacts/") => Response::json(
            201,
            &json!({"job_id": "job-1", "path": "out.txt", "size": 4,
                    "sha256": hex::encode(Sha256::digest(b"other")), "created_at_ms": 0}),
        ),
        _ => Response::empty(204),
    });
    let code = runner::run(&config(tmp.path(), &server.url)).unwrap();
    assert_eq!(code, 0);
    let requests = server.requests();
    let logs: Vec<u8> = requests
        .iter()
        .filter(|r| r.path() == "/guest/v1/log")
        .flat_map(|r| r.body.clone())
        .collect();
    assert_eq!(logs, b"***\n");
    let done: Value = serde_json::from_slice(&requests.last().unwrap().body).unwrap();
    assert_eq!(done["uploaded"], 0);
    assert!(
        done["errors"][0]
            .as_str()
            .unwrap()
            .contains("the daemon stored sha256"),
        "{done}"
    );
}
