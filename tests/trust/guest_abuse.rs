//! A guest that pushes: past its quotas (log, artifact total, artifact count), out of its artifact
//! folder (`..`, absolute, percent-encoded, symlinked paths), and against the API itself (many
//! requests at once, bodies held open). Each abuse is refused and nothing else is harmed: the job
//! goes on, other jobs are served, host files stay as they were, answers carry no host path.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::daemon::{repo_dir, Daemon};
use crate::common::guest::{external_guest_fake, provisioning_file, read_answer, Answer, Guest};

const LIMIT: Duration = Duration::from_secs(60);

/// A daemon whose guests the test plays, with `extra` config lines. The governor is off: a busy
/// test host must not hold a second job back (admission still stops at `max_concurrent`).
fn daemon(dir: &Path, extra: &str) -> (Daemon, PathBuf) {
    use agentlab::config::tuning::Tuning;
    let mut tuning = Tuning::load(&repo_dir().join("tuning/default.yaml")).unwrap();
    tuning.governor.enabled = false;
    tuning.governor.budget.disk_min_free_percent = None;
    std::fs::create_dir_all(dir.join("tuning")).unwrap();
    std::fs::write(
        dir.join("tuning/default.yaml"),
        yaml_serde::to_string(&tuning).unwrap(),
    )
    .unwrap();
    let provisioning = provisioning_file(dir);
    let config = format!("{}{extra}", external_guest_fake(&provisioning));
    (Daemon::start(dir, "fake", &config), provisioning)
}

/// A job and its guest, phoned home and bootstrapped; its session token.
fn job(daemon: &Daemon, provisioning: &Path) -> (String, Guest, String) {
    let id = daemon.submit(&json!({"profile": "balanced", "task": "t", "command": "true"}));
    let guest = Guest::of_job(provisioning, &id, LIMIT);
    let spec = guest.start();
    let token = spec["session_token"].as_str().unwrap().to_owned();
    (id, guest, token)
}

fn completes(daemon: &Daemon, guest: &Guest, id: &str, token: &str) {
    guest.finish(token, 0);
    let job = daemon.wait_terminal(id, LIMIT);
    assert_eq!(job["status"], "COMPLETED", "{job}");
}

fn quota_events(daemon: &Daemon, id: &str) -> Vec<String> {
    let (status, body) = daemon.get(&format!("/v1/jobs/{id}/events"));
    assert_eq!(status, 200, "{body}");
    body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "quota")
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect()
}

fn artifacts(daemon: &Daemon, id: &str) -> Vec<(String, u64)> {
    let (status, body) = daemon.get(&format!("/v1/jobs/{id}/artifacts"));
    assert_eq!(status, 200, "{body}");
    body["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["path"].as_str().unwrap().to_owned(),
                a["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The names in a folder, sorted; empty if it does not exist.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn scratch(dir: &Path) -> PathBuf {
    dir.join("data/artifacts/.tmp")
}

fn assert_no_host_path(answer: &Answer, dir: &Path) {
    let host = dir.to_string_lossy();
    assert!(
        !answer.text.contains(&*host),
        "the answer names a host path: {}",
        answer.text
    );
}

#[test]
fn parallel_log_posts_past_the_cap_get_413_and_one_event_and_the_job_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // Room for all 50 posts at once: the cap, not the request limit, must do the refusing. Posts
    // of 30 KB overlap enough on this daemon that appends not taking turns break the cap.
    let (daemon, provisioning) = daemon(
        dir.path(),
        "log_max_bytes: 300000\nguest_requests_per_job: 64\n",
    );
    let (id, guest, token) = job(&daemon, &provisioning);

    let answers: Vec<Answer> = std::thread::scope(|scope| {
        let posts: Vec<_> = (0..50u8)
            .map(|i| {
                let (guest, token) = (&guest, &token);
                scope.spawn(move || {
                    let mut line = vec![b'a' + i % 26; 29_999];
                    line.push(b'\n');
                    guest.post(token, "/guest/v1/log", line)
                })
            })
            .collect();
        posts.into_iter().map(|p| p.join().unwrap()).collect()
    });
    let stored = answers.iter().filter(|a| a.status == 204).count();
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status == 413).collect();
    assert_eq!(
        (stored, refused.len()),
        (10, 40),
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    for answer in &refused {
        assert_eq!(
            answer.json["error"]["code"], "payload_too_large",
            "{}",
            answer.text
        );
        assert!(answer.text.contains("log_max_bytes"), "{}", answer.text);
        assert_no_host_path(answer, dir.path());
    }

    // The stored log: ten whole posts, each unbroken, then the notice, and nothing more.
    let log = daemon.job_log(&id);
    let (body, notice) = log.split_at(300_000);
    assert_eq!(notice, "\n[agentlab: log truncated at 300000 bytes]\n");
    assert_eq!(body.lines().count(), 10);
    for line in body.lines() {
        assert_eq!(line.len(), 29_999);
        assert!(
            line.bytes().all(|b| b == line.as_bytes()[0]),
            "a post was split by another"
        );
    }
    let events = quota_events(&daemon, &id);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].contains("log_max_bytes"), "{events:?}");

    // Later posts are refused as well, and say so without another event.
    let late = guest.post(&token, "/guest/v1/log", b"more\n".to_vec());
    assert_eq!(late.status, 413, "{}", late.text);
    assert_eq!(quota_events(&daemon, &id).len(), 1);
    assert_eq!(daemon.job_log(&id), log);
    completes(&daemon, &guest, &id, &token);
}

#[test]
fn artifacts_past_the_job_total_and_file_count_get_413_and_the_job_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, provisioning) = daemon(
        dir.path(),
        "artifact_max_bytes: 600\nartifact_job_max_bytes: 1000\nartifact_max_files: 3\n\
         guest_requests_per_job: 16\n",
    );
    let (id, guest, token) = job(&daemon, &provisioning);
    let put = |path: &str, size: usize| guest.put_artifact(&token, path, vec![b'x'; size]);
    let refused = |answer: Answer, key: &str| {
        assert_eq!(answer.status, 413, "{}", answer.text);
        assert!(answer.text.contains(key), "{}", answer.text);
        assert_no_host_path(&answer, dir.path());
    };

    // The smaller of what one artifact may be and what the job has left says: here, one's.
    refused(put("big", 700), "(artifact_max_bytes)");
    assert_eq!(put("a", 400).status, 201);
    assert_eq!(put("b", 400).status, 201);
    refused(put("c", 400), "artifact_job_max_bytes");
    // A re-upload replaces: `a` counts once, at its new size.
    assert_eq!(put("a", 100).status, 201);
    assert_eq!(put("d", 300).status, 201);
    refused(put("e", 10), "artifact_max_files");
    assert_eq!(put("d", 350).status, 201, "replacing is no new file");
    refused(put("e", 10), "artifact_max_files");
    // Replacing `b` (400) by 600 bytes would make 1050 in all; a refused upload keeps the old.
    refused(put("b", 600), "artifact_job_max_bytes");

    let mut events = quota_events(&daemon, &id);
    events.sort();
    assert_eq!(events.len(), 3, "one per quota, however often: {events:?}");
    assert!(events.iter().any(|e| e.contains("artifact_job_max_bytes")));
    assert!(events.iter().any(|e| e.contains("artifact_max_files")));
    assert!(events.iter().any(|e| e.contains("(artifact_max_bytes)")));
    let stored = artifacts(&daemon, &id);
    assert_eq!(
        stored,
        [("a".into(), 100), ("b".into(), 400), ("d".into(), 350)]
    );
    assert_eq!(
        daemon.get_bytes(&format!("/v1/jobs/{id}/artifacts/d")),
        vec![b'x'; 350]
    );
    assert_eq!(
        names(&dir.path().join("data/artifacts").join(&id)),
        ["a", "b", "d"]
    );

    // Ten uploads at once on a second job: the quotas hold for them together.
    let (second, guest2, token2) = job(&daemon, &provisioning);
    let answers: Vec<Answer> = std::thread::scope(|scope| {
        let puts: Vec<_> = (0..10)
            .map(|i| {
                let (guest2, token2) = (&guest2, &token2);
                scope.spawn(move || guest2.put_artifact(token2, &format!("p{i}"), vec![b'y'; 300]))
            })
            .collect();
        puts.into_iter().map(|p| p.join().unwrap()).collect()
    });
    let created = answers.iter().filter(|a| a.status == 201).count();
    let too_large = answers.iter().filter(|a| a.status == 413).count();
    assert_eq!((created, too_large), (3, 7), "{answers:?}");
    let stored = artifacts(&daemon, &second);
    assert_eq!(stored.len(), 3, "{stored:?}");
    assert!(stored.iter().map(|(_, size)| size).sum::<u64>() <= 1000);
    let on_disk = names(&dir.path().join("data/artifacts").join(&second));
    let listed: Vec<String> = stored.into_iter().map(|(path, _)| path).collect();
    assert_eq!(on_disk, listed, "no refused upload left a file");
    assert!(names(&scratch(dir.path())).is_empty());

    completes(&daemon, &guest, &id, &token);
    completes(&daemon, &guest2, &second, &token2);
}

#[test]
fn escaping_and_symlinked_artifact_paths_are_refused_and_nothing_outside_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, provisioning) = daemon(dir.path(), "");
    let (id, guest, token) = job(&daemon, &provisioning);
    let data = dir.path().join("data");
    let job_dir = data.join("artifacts").join(&id);

    // What the host has around the job's folder: a folder outside with a file to keep, and links
    // to both in the job's folder (a guest cannot make links; the host's tree might hold some).
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("sentinel"), b"keep me").unwrap();
    std::fs::create_dir_all(&job_dir).unwrap();
    std::os::unix::fs::symlink(&outside, job_dir.join("link")).unwrap();
    std::os::unix::fs::symlink(outside.join("sentinel"), job_dir.join("file")).unwrap();
    // The scratch folder is the daemon's own (checked empty below).
    let around =
        |path: &Path| -> Vec<String> { names(path).into_iter().filter(|n| n != ".tmp").collect() };
    let before = [
        around(dir.path()),
        around(&data),
        around(&data.join("artifacts")),
    ];

    // Absolute: as the guest sends it, with a second `/` after the route's.
    let absolute = format!("/{}", dir.path().join("escape.txt").display());
    let targets = [
        "/etc/agentlab-escape".to_owned(),
        "../../../escape.txt".to_owned(),
        "a/../../../../escape.txt".to_owned(),
        "..".to_owned(),
        absolute.clone(),
        "%2e%2e/%2e%2e/%2e%2e/escape.txt".to_owned(),
        "%2E%2E%2F%2E%2E%2F%2E%2E%2Fescape.txt".to_owned(),
        "..%2f..%2f..%2fescape.txt".to_owned(),
        "link/escape.txt".to_owned(),
        "link/sentinel".to_owned(),
        "file".to_owned(),
    ];
    for target in &targets {
        let answer = guest.raw(
            &format!("PUT /guest/v1/artifacts/{target} HTTP/1.1\r\nAuthorization: Bearer {token}"),
            b"written where it must not be",
        );
        assert_eq!(answer.status, 400, "{target}: {}", answer.text);
        assert_eq!(answer.json["error"]["code"], "bad_request", "{target}");
        // The guest's own path comes back (the absolute one names the test's folder itself).
        if *target != absolute {
            assert_no_host_path(&answer, dir.path());
        }
        assert!(
            !answer.text.contains(&*data.to_string_lossy()),
            "{}",
            answer.text
        );
    }
    assert!(!Path::new("/etc/agentlab-escape").exists());

    assert_eq!(std::fs::read(outside.join("sentinel")).unwrap(), b"keep me");
    assert_eq!(names(&outside), ["sentinel"]);
    assert_eq!(
        [
            around(dir.path()),
            around(&data),
            around(&data.join("artifacts")),
        ],
        before,
        "no new file next to the job's folder or above it"
    );
    assert_eq!(names(&job_dir), ["file", "link"]);
    assert!(names(&scratch(dir.path())).is_empty());
    assert!(artifacts(&daemon, &id).is_empty());

    // A host-side failure: the guest hears that it was internal, the daemon's log has where.
    std::fs::create_dir_all(data.join("logs").join(format!("{id}.log"))).unwrap();
    let failed = guest.post(&token, "/guest/v1/log", b"hello\n".to_vec());
    assert_eq!(failed.status, 500, "{}", failed.text);
    assert_eq!(failed.json["error"]["code"], "internal", "{}", failed.text);
    assert_no_host_path(&failed, dir.path());
    assert!(!failed.text.contains(".log"), "{}", failed.text);
    assert!(
        daemon.log().contains(&format!("{id}.log")),
        "{}",
        daemon.log()
    );

    // The guest's honest upload still lands, and the job completes.
    let fine = guest.put_artifact(&token, "out/result.txt", b"42".to_vec());
    assert_eq!(fine.status, 201, "{}", fine.text);
    assert_eq!(
        daemon.get_bytes(&format!("/v1/jobs/{id}/artifacts/out/result.txt")),
        b"42"
    );
    // Decoded once, exactly: the runner's encoding of `100% done.txt` names that file.
    let encoded = guest.put_artifact(&token, "out/100%25%20done.txt", b"%".to_vec());
    assert_eq!(encoded.status, 201, "{}", encoded.text);
    assert_eq!(encoded.json["path"], "out/100% done.txt");
    assert!(job_dir.join("out/100% done.txt").is_file());
    completes(&daemon, &guest, &id, &token);
}

/// Waits for `count` answers on `answers`, as long as a loaded host needs.
fn receive(answers: &mpsc::Receiver<(usize, Answer)>, count: usize) -> Vec<(usize, Answer)> {
    let deadline = Instant::now() + LIMIT;
    let mut got = Vec::new();
    while got.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match answers.recv_timeout(left) {
            Ok(answer) => got.push(answer),
            Err(_) => panic!("only {} of {count} answers came: {got:?}", got.len()),
        }
    }
    got
}

#[test]
fn a_slow_guest_holding_uploads_open_gets_429_past_its_limit_and_another_job_finishes() {
    let dir = tempfile::tempdir().unwrap();
    // Bodies may stall for long here: the stalls must last until the other job is done.
    let (daemon, provisioning) = daemon(dir.path(), "guest_body_timeout: 10m\n");
    let (slow, slow_guest, slow_token) = job(&daemon, &provisioning);
    let (other, guest, token) = job(&daemon, &provisioning);

    // Job A opens 20 uploads and stalls in each: 8 (its limit) are held, 12 refused at once.
    let (tx, answers) = mpsc::channel();
    let mut streams = Vec::new();
    for i in 0..20 {
        let stream = slow_guest.open_stalled(
            &format!(
                "PUT /guest/v1/artifacts/slow{i} HTTP/1.1\r\nAuthorization: Bearer {slow_token}"
            ),
            1 << 20,
            &[b'z'; 1000],
        );
        let mut reader = stream.try_clone().unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send((i, read_answer(&mut reader)));
        });
        streams.push(stream);
    }
    let refused = receive(&answers, 12);
    for (i, answer) in &refused {
        assert_eq!(answer.status, 429, "upload {i}: {}", answer.text);
        assert!(
            answer.text.contains("guest_requests_per_job"),
            "{}",
            answer.text
        );
    }
    let extra = slow_guest.post(&slow_token, "/guest/v1/log", b"one more\n".to_vec());
    assert_eq!(extra.status, 429, "{}", extra.text);

    // Job B, played normally meanwhile, is served and completes.
    let log = guest.post(&token, "/guest/v1/log", b"hello\n".to_vec());
    assert_eq!(log.status, 204, "{}", log.text);
    let put = guest.put_artifact(&token, "out/result.txt", b"42".to_vec());
    assert_eq!(put.status, 201, "{}", put.text);
    completes(&daemon, &guest, &other, &token);

    // A's 8 uploads were open all along, and still are: unanswered, their scratch files there.
    assert!(answers.try_recv().is_err(), "a held upload was answered");
    assert_eq!(names(&scratch(dir.path())).len(), 8);
    assert!(artifacts(&daemon, &slow).is_empty());

    // A hangs up: its uploads are dropped, their scratch files go, and A can go on.
    for stream in &streams {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    let deadline = Instant::now() + LIMIT;
    while !names(&scratch(dir.path())).is_empty() {
        assert!(Instant::now() < deadline, "scratch files stayed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = slow_guest.post(&slow_token, "/guest/v1/log", b"back\n".to_vec());
    assert_eq!(after.status, 204, "{}", after.text);
    assert!(artifacts(&daemon, &slow).is_empty());
    completes(&daemon, &slow_guest, &slow, &slow_token);
}

#[test]
fn a_stalled_body_is_cut_off_after_the_body_timeout_and_leaves_no_scratch_file() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, provisioning) = daemon(dir.path(), "guest_body_timeout: 1s\n");
    let (id, guest, token) = job(&daemon, &provisioning);

    for (head, what) in [
        ("PUT /guest/v1/artifacts/stalled.bin", "upload"),
        ("POST /guest/v1/log", "log post"),
        ("POST /guest/v1/done", "done report"),
    ] {
        let mut stream = guest.open_stalled(
            &format!("{head} HTTP/1.1\r\nAuthorization: Bearer {token}"),
            1000,
            b"{\"partial",
        );
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        let answer = read_answer(&mut stream);
        assert_eq!(answer.status, 408, "{what}: {}", answer.text);
        assert_eq!(answer.json["error"]["code"], "request_timeout", "{what}");
        // The handler cleaned up before it answered.
        assert!(names(&scratch(dir.path())).is_empty(), "{what}");
    }
    assert!(artifacts(&daemon, &id).is_empty());
    assert_eq!(daemon.job_log(&id), "");
    let events: Value = daemon.get(&format!("/v1/jobs/{id}/events")).1;
    assert!(
        !events.to_string().contains("partial"),
        "the stalled done report was not taken: {events}"
    );
    completes(&daemon, &guest, &id, &token);
}
