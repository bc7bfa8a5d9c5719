//! The test-played guest itself: a job run through the real guest API from phone-home to done.

use std::time::Duration;

use serde_json::json;

use crate::common::daemon::Daemon;
use crate::common::guest::{external_guest_fake, provisioning_file, Guest};

#[test]
fn a_test_played_guest_runs_a_job_to_completion() {
    let dir = tempfile::tempdir().unwrap();
    let provisioning = provisioning_file(dir.path());
    let daemon = Daemon::start(dir.path(), "fake", &external_guest_fake(&provisioning));
    let id = daemon.submit(&json!({"profile": "balanced", "task": "t", "command": "true"}));
    let guest = Guest::of_job(&provisioning, &id, Duration::from_secs(30));
    let spec = guest.start();
    assert_eq!(spec["job_id"], id.as_str());
    let token = spec["session_token"].as_str().unwrap().to_owned();

    let log = guest.post(&token, "/guest/v1/log", b"hello from the guest\n".to_vec());
    assert_eq!(log.status, 204, "{}", log.text);
    let put = guest.put_artifact(&token, "out/result.txt", b"42".to_vec());
    assert_eq!(put.status, 201, "{}", put.text);
    guest.finish(&token, 0);

    let job = daemon.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "COMPLETED", "{job}");
    assert_eq!(daemon.job_log(&id), "hello from the guest\n");
    assert_eq!(
        daemon.get_bytes(&format!("/v1/jobs/{id}/artifacts/out/result.txt")),
        b"42"
    );
}
