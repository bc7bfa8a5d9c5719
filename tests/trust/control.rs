//! The TCP control API's token, the secrets a job carries (env values, repo URL credentials) and
//! the guest's tokens, each tried the way an attacker would against the real daemon.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::daemon::{test_tuning, Daemon};
use crate::common::guest::{external_guest_fake, provisioning_file, Answer, Guest};
use crate::common::vm::free_port;

const LIMIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "c0ntrol-t0ken-0123456789abcdef";

fn token_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
    let path = dir.join("control.token");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn tcp_config(port: u16, token: &Path) -> String {
    format!(
        "control_listen: 127.0.0.1:{port}\ncontrol_token_file: {}\n",
        token.display()
    )
}

/// Nothing answers on `port`, and the control socket was never made.
fn assert_nothing_listens(dir: &Path, port: u16) {
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something listens on {port}"
    );
    assert!(!dir.join("agentlabd.sock").exists(), "the socket was made");
}

#[test]
fn an_empty_or_missing_token_file_stops_start_up_naming_the_file() {
    for text in ["", "  \n\t\n"] {
        let dir = tempfile::tempdir().unwrap();
        let token = token_file(dir.path(), text, 0o600);
        let port = free_port();
        let (status, log) =
            Daemon::start_expecting_failure(dir.path(), "fake", &tcp_config(port, &token));
        assert!(!status.success(), "{log}");
        assert!(log.contains(&token.display().to_string()), "{log}");
        assert!(log.contains("is empty"), "{log}");
        assert_nothing_listens(dir.path(), port);
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such.token");
    let port = free_port();
    let (status, log) =
        Daemon::start_expecting_failure(dir.path(), "fake", &tcp_config(port, &missing));
    assert!(!status.success(), "{log}");
    assert!(log.contains(&missing.display().to_string()), "{log}");
    assert_nothing_listens(dir.path(), port);
}

#[test]
fn a_token_file_others_may_read_or_write_stops_start_up_naming_the_file() {
    for mode in [0o644, 0o604, 0o602] {
        let dir = tempfile::tempdir().unwrap();
        let token = token_file(dir.path(), TOKEN, mode);
        let port = free_port();
        let (status, log) =
            Daemon::start_expecting_failure(dir.path(), "fake", &tcp_config(port, &token));
        assert!(!status.success(), "{mode:o}: {log}");
        assert!(log.contains(&token.display().to_string()), "{log}");
        assert!(log.contains("every user"), "{log}");
        assert!(!log.contains(TOKEN), "the error shows the token: {log}");
        assert_nothing_listens(dir.path(), port);
        assert_eq!(std::fs::read_to_string(&token).unwrap(), TOKEN);
    }
}

fn tcp_get(port: u16, path: &str, authorization: Option<&str>) -> (u16, String) {
    let client = reqwest::blocking::Client::builder()
        .timeout(LIMIT)
        .build()
        .unwrap();
    let mut request = client.get(format!("http://127.0.0.1:{port}{path}"));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().unwrap();
    (response.status().as_u16(), response.text().unwrap())
}

#[test]
fn the_tcp_api_wants_the_token_and_says_nothing_about_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), &format!("{TOKEN}\n"), 0o600);
    let port = free_port();
    let daemon = Daemon::start(dir.path(), "fake", &tcp_config(port, &token));

    let (status, missing) = tcp_get(port, "/v1/jobs", None);
    assert_eq!(status, 401, "{missing}");
    let half = &TOKEN[..TOKEN.len() / 2];
    let wrong = [
        "Bearer ".to_owned(),
        "Bearer wrong-token".to_owned(),
        format!("Bearer {half}"),
        format!("Bearer {TOKEN}x"),
        format!("Basic {TOKEN}"),
        TOKEN.to_owned(),
    ];
    for value in &wrong {
        let (status, body) = tcp_get(port, "/v1/jobs", Some(value));
        assert_eq!(status, 401, "{value}: {body}");
        assert_eq!(body, missing, "{value}: the answers differ");
    }
    assert!(!missing.contains(half), "{missing}");
    let (status, health) = tcp_get(port, "/health", Some("Bearer nope"));
    assert_eq!((status, health), (401, missing.clone()));

    let right = format!("Bearer {TOKEN}");
    let (status, jobs) = tcp_get(port, "/v1/jobs", Some(&right));
    assert_eq!(status, 200, "{jobs}");
    assert_eq!(
        serde_json::from_str::<Value>(&jobs).unwrap()["jobs"],
        json!([])
    );
    assert_eq!(tcp_get(port, "/health", Some(&right)).0, 200);
    // The socket needs no token, and the refusals changed nothing.
    assert_eq!(daemon.get("/health").0, 200);
    assert!(!daemon.log().contains(TOKEN), "the token is in the log");
}

/// Reports the exit and `done` with the given upload errors.
fn finish_with_errors(guest: &Guest, token: &str, errors: &[&str]) {
    let exit = guest.post_json(token, "/guest/v1/exit", &json!({"exit_code": 0}));
    assert_eq!(exit.status, 204, "{}", exit.text);
    let done = guest.post_json(
        token,
        "/guest/v1/done",
        &json!({"uploaded": 0, "errors": errors}),
    );
    assert_eq!(done.status, 204, "{}", done.text);
}

fn events_text(daemon: &Daemon, id: &str) -> String {
    let (status, events) = daemon.get(&format!("/v1/jobs/{id}/events"));
    assert_eq!(status, 200, "{events}");
    events.to_string()
}

#[test]
fn a_guest_printing_a_secret_env_value_gets_it_masked_in_the_stored_log() {
    const SECRET: &str = "s3cr3t-value-123456";
    let dir = tempfile::tempdir().unwrap();
    let provisioning = provisioning_file(dir.path());
    let daemon = Daemon::start(dir.path(), "fake", &external_guest_fake(&provisioning));
    let id = daemon.submit(&json!({
        "profile": "balanced", "task": "t", "command": "true",
        "env": {"API_KEY": SECRET, "SHORT": "abc"},
    }));
    let guest = Guest::of_job(&provisioning, &id, LIMIT);
    let spec = guest.start();
    assert_eq!(spec["env"]["API_KEY"], SECRET, "the guest needs the value");
    let token = spec["session_token"].as_str().unwrap().to_owned();

    // Whole in one post, split across two posts, and at the very end (held back until done).
    for post in [
        format!("key={SECRET} short=abc\n"),
        format!("split {}", &SECRET[..7]),
        format!("{} end\n", &SECRET[7..]),
        format!("last {}", &SECRET[..4]),
    ] {
        let answer = guest.post(&token, "/guest/v1/log", post.into_bytes());
        assert_eq!(answer.status, 204, "{}", answer.text);
    }
    finish_with_errors(&guest, &token, &[&format!("out/x: cannot read {SECRET}")]);

    let job = daemon.wait_terminal(&id, LIMIT);
    assert_eq!(job["status"], "COMPLETED", "{job}");
    assert_eq!(
        daemon.job_log(&id),
        format!("key=*** short=abc\nsplit *** end\nlast {}", &SECRET[..4]),
        "a value under the minimum (abc) stays; a possible start of one comes at the end"
    );
    let events = events_text(&daemon, &id);
    assert!(events.contains("cannot read ***"), "{events}");
    for (what, text) in [
        ("job", job.to_string()),
        ("events", events),
        ("daemon log", daemon.log()),
    ] {
        assert!(!text.contains(SECRET), "{what} shows the secret: {text}");
    }
}

#[test]
fn credentials_in_a_repo_url_show_nowhere_but_in_the_guest_spec() {
    const REPO: &str =
        "https://user:hunter2-token@example.invalid/x.git?access_token=query-t0ken-42";
    const SHOWN: &str = "https://***@example.invalid/x.git?access_token=***";
    let dir = tempfile::tempdir().unwrap();
    let provisioning = provisioning_file(dir.path());
    let daemon = Daemon::start(dir.path(), "fake", &external_guest_fake(&provisioning));
    let id = daemon.submit(&json!({
        "profile": "balanced", "task": "t", "command": "true", "repo": REPO, "ref": "main",
    }));
    let guest = Guest::of_job(&provisioning, &id, LIMIT);
    let spec = guest.start();
    assert_eq!(
        spec["repo"],
        json!({"kind": "url", "url": REPO, "ref": "main"}),
        "the guest clones with the whole URL"
    );
    let token = spec["session_token"].as_str().unwrap().to_owned();
    let echoed = guest.post(
        &token,
        "/guest/v1/log",
        format!("fatal: could not read from {REPO}\n").into_bytes(),
    );
    assert_eq!(echoed.status, 204, "{}", echoed.text);
    guest.finish(&token, 0);
    let job = daemon.wait_terminal(&id, LIMIT);
    assert_eq!(job["status"], "COMPLETED", "{job}");

    assert_eq!(job["repo"], SHOWN);
    let (status, list) = daemon.get("/v1/jobs");
    assert_eq!(status, 200);
    assert_eq!(list["jobs"][0]["repo"], SHOWN);
    assert_eq!(
        daemon.job_log(&id),
        "fatal: could not read from https://user:***@example.invalid/x.git?access_token=***\n",
        "the user name is under the masking minimum; the token is masked"
    );
    for (what, text) in [
        ("job", job.to_string()),
        ("job list", list.to_string()),
        ("events", events_text(&daemon, &id)),
        ("daemon log", daemon.log()),
    ] {
        assert!(!text.contains("hunter2-token"), "{what}: {text}");
        assert!(!text.contains("query-t0ken-42"), "{what}: {text}");
        assert!(!text.contains("user:"), "{what}: {text}");
    }
}

/// Two jobs of one daemon, each with a played guest past bootstrap; their session tokens.
struct TwoJobs {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    jobs: [(String, Guest, String); 2],
}

fn two_started_jobs() -> TwoJobs {
    let dir = tempfile::tempdir().unwrap();
    // Both at once on any host: the governor (vCPU budget, pressure) would queue the second.
    let mut tuning: agentlab::config::tuning::Tuning =
        yaml_serde::from_str(&test_tuning()).unwrap();
    tuning.governor.enabled = false;
    std::fs::create_dir_all(dir.path().join("tuning")).unwrap();
    std::fs::write(
        dir.path().join("tuning/default.yaml"),
        yaml_serde::to_string(&tuning).unwrap(),
    )
    .unwrap();
    let provisioning = provisioning_file(dir.path());
    let daemon = Daemon::start(dir.path(), "fake", &external_guest_fake(&provisioning));
    let start = |task: &str| {
        let id = daemon.submit(&json!({"profile": "balanced", "task": task, "command": "true"}));
        let guest = Guest::of_job(&provisioning, &id, LIMIT);
        let spec = guest.start();
        let token = spec["session_token"].as_str().unwrap().to_owned();
        (id, guest, token)
    };
    let jobs = [start("a"), start("b")];
    TwoJobs {
        _dir: dir,
        daemon,
        jobs,
    }
}

/// What every refused guest call answers, whatever the reason: the missing token's answer.
fn refusal(guest: &Guest) -> Answer {
    let answer = guest.bootstrap_with("");
    assert_eq!(answer.status, 401, "{}", answer.text);
    answer
}

fn assert_refused_alike(answer: &Answer, refusal: &Answer, what: &str) {
    assert_eq!(answer.status, 401, "{what}: {}", answer.text);
    assert_eq!(answer.text, refusal.text, "{what}: the refusals differ");
}

#[test]
fn one_time_tokens_work_once_and_no_token_works_as_another_kind() {
    let dir = tempfile::tempdir().unwrap();
    let provisioning = provisioning_file(dir.path());
    let daemon = Daemon::start(dir.path(), "fake", &external_guest_fake(&provisioning));
    let id = daemon.submit(&json!({"profile": "balanced", "task": "t", "command": "true"}));
    let guest = Guest::of_job(&provisioning, &id, LIMIT);
    let refused = refusal(&guest);
    let boot = guest.provisioning.bootstrap_token.clone();
    let home = guest
        .provisioning
        .phone_home_url
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let phone_home_with = |token: &str| -> Answer {
        let url = guest.url(&format!("/guest/v1/phone-home/{token}"));
        let response = reqwest::blocking::Client::new().post(url).send().unwrap();
        let status = response.status().as_u16();
        let text = response.text().unwrap();
        Answer {
            status,
            json: Value::Null,
            text,
        }
    };

    // Each one-time token as another kind, before its own use: refused, and not used up.
    let log = |token: &str| guest.post(token, "/guest/v1/log", b"sneaked in\n".to_vec());
    assert_refused_alike(&log(&boot), &refused, "bootstrap token as session");
    assert_refused_alike(&log(&home), &refused, "phone-home token as session");
    assert_refused_alike(
        &guest.bootstrap_with(&home),
        &refused,
        "phone-home as bootstrap",
    );
    assert_refused_alike(&phone_home_with(&boot), &refused, "bootstrap as phone-home");

    assert_eq!(phone_home_with(&home).status, 200);
    assert_refused_alike(&phone_home_with(&home), &refused, "phone-home again");
    let spec = guest.bootstrap_with(&boot);
    assert_eq!(spec.status, 200, "{}", spec.text);
    assert_refused_alike(&guest.bootstrap_with(&boot), &refused, "bootstrap again");
    let session = spec.json["session_token"].as_str().unwrap().to_owned();
    assert_refused_alike(
        &guest.bootstrap_with(&session),
        &refused,
        "session as bootstrap",
    );
    assert_refused_alike(
        &phone_home_with(&session),
        &refused,
        "session as phone-home",
    );
    assert_refused_alike(&log("not-a-token"), &refused, "an unknown token");

    // The job goes on with its session token; none of the refused posts reached its log.
    assert_eq!(log(&session).status, 204);
    guest.finish(&session, 0);
    let job = daemon.wait_terminal(&id, LIMIT);
    assert_eq!(job["status"], "COMPLETED", "{job}");
    assert_eq!(
        daemon.job_log(&id),
        "sneaked in\n",
        "only the session's post"
    );
}

#[test]
fn a_session_token_acts_on_its_own_job_only_and_dies_with_it() {
    let TwoJobs { daemon, jobs, .. } = two_started_jobs();
    let [(a, guest_a, token_a), (b, guest_b, token_b)] = &jobs;
    let refused = refusal(guest_a);
    for (guest, token, text) in [
        (guest_a, token_a, "from a\n"),
        (guest_b, token_b, "from b\n"),
        // Guest B's address with A's token: still A's job, whoever sends it.
        (guest_b, token_a, "a again\n"),
    ] {
        let answer = guest.post(token, "/guest/v1/log", text.as_bytes().to_vec());
        assert_eq!(answer.status, 204, "{}", answer.text);
    }
    assert_eq!(
        guest_b
            .put_artifact(token_a, "out/a.txt", b"A".to_vec())
            .status,
        201
    );

    guest_a.finish(token_a, 0);
    let job_a = daemon.wait_terminal(a, LIMIT);
    assert_eq!(job_a["status"], "COMPLETED", "{job_a}");
    // A has ended: its token does nothing any more, on any route.
    let after = [
        guest_a.post(token_a, "/guest/v1/log", b"after the end\n".to_vec()),
        guest_a.post_json(token_a, "/guest/v1/exit", &json!({"exit_code": 3})),
        guest_a.put_artifact(token_a, "out/late.txt", b"late".to_vec()),
        guest_a.post_json(token_a, "/guest/v1/done", &json!({"uploaded": 0})),
        guest_a.get(token_a, "/guest/v1/repo.bundle").0,
    ];
    for answer in &after {
        assert_refused_alike(answer, &refused, "A's token after A ended");
    }

    // B goes on untouched and ends on its own.
    assert_eq!(
        guest_b
            .post(token_b, "/guest/v1/log", b"b again\n".to_vec())
            .status,
        204
    );
    guest_b.finish(token_b, 0);
    let job_b = daemon.wait_terminal(b, LIMIT);
    assert_eq!(job_b["status"], "COMPLETED", "{job_b}");
    assert_eq!(daemon.job_log(a), "from a\na again\n");
    assert_eq!(daemon.job_log(b), "from b\nb again\n");
    assert_eq!(daemon.job(a)["exit_code"], 0);
    let artifacts =
        |id: &str| daemon.get(&format!("/v1/jobs/{id}/artifacts")).1["artifacts"].clone();
    let paths_a: Vec<Value> = artifacts(a)
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["path"].clone())
        .collect();
    assert_eq!(paths_a, [json!("out/a.txt")]);
    assert_eq!(artifacts(b), json!([]));
}
