//! The warm pool end to end on the local QEMU backend, with real VMs: READY sandboxes booted
//! ahead of any job, a job that takes one (its phase list says so) and completes, the refill,
//! a job that arrives while the pool is empty and boots its own, a SIGHUP that resizes the
//! pool, a daemon killed with a full pool and a job just claimed, and a pool on a template
//! without a runner, whose sandboxes fetch the daemon's behind a token of their own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::{repo_roots, Daemon};
use common::vm::{
    artifact_at, assert_nothing_left, free_port, git_repo, images, qemu_processes,
    runnerless_images, stripped_runner,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const LIMIT: Duration = Duration::from_secs(240);

/// The tests' tuning with a `balanced` pool of `pool`; `budget` adds keys to the governor's
/// static budget.
fn tuning(pool: u32, budget: &str) -> String {
    format!(
        "phase_timeouts: {{cloud_init: 90s, guest_agent: 60s, run: 120s, upload: 60s, destroy: 30s}}\n\
         intervals: {{guest_poll: 250ms, reconcile: 2s}}\n\
         governor: {{budget: {{disk_min_free_percent: null{budget}}}, boot_cap: {{initial: 2}}}}\n\
         pool: {{profiles: {{balanced: {pool}}}, max_idle: 10m}}\n"
    )
}

fn write_tuning(dir: &Path, pool: u32) {
    write_tuning_with(dir, pool, "");
}

fn write_tuning_with(dir: &Path, pool: u32, budget: &str) {
    std::fs::create_dir_all(dir.join("tuning")).unwrap();
    std::fs::write(dir.join("tuning/default.yaml"), tuning(pool, budget)).unwrap();
}

fn daemon(dir: &Path, pool: u32, extra: &str) -> Daemon {
    write_tuning(dir, pool);
    start(dir, extra)
}

fn start(dir: &Path, extra: &str) -> Daemon {
    start_on(dir, &images(), extra)
}

fn start_on(dir: &Path, images: &Path, extra: &str) -> Daemon {
    let qemu = format!(
        "{roots}qemu:\n  images_dir: {}\n  accel: tcg\n  memory_mb_cap: 384\n  cores_cap: 1\n{extra}",
        images.display(),
        roots = repo_roots(&[dir]),
    );
    Daemon::start(dir, "qemu", &qemu)
}

/// The finished snapshots in the daemon's data folder (a making in progress has a longer name).
fn snapshot_ids(dir: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(dir.join("data/snapshots"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.len() == 16)
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

fn balanced(daemon: &Daemon) -> Value {
    let (status, pool) = daemon.get("/v1/pool");
    assert_eq!(status, 200, "{pool}");
    pool["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["profile"] == "balanced")
        .cloned()
        .unwrap_or(Value::Null)
}

/// The pool's sandbox ids once `balanced` has `ready` READY and none booting.
fn wait_ready(daemon: &Daemon, ready: u64) -> BTreeSet<String> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let counts = balanced(daemon);
        if counts["ready"] == ready && counts["booting"] == 0 && counts["destroying"] == 0 {
            let (_, pool) = daemon.get("/v1/pool");
            return pool["sandboxes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_owned())
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "pool never had {ready} READY: {counts}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Each phase's result in a job's phase list.
fn phase_results(job: &Value) -> Vec<(String, String)> {
    job["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["phase"].as_str().unwrap().to_owned(),
                p["result"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect()
}

fn boot_phases_from_pool(job: &Value) -> bool {
    let results = phase_results(job);
    ["clone", "start", "cloud_init", "guest_agent"]
        .iter()
        .all(|phase| results.iter().any(|(p, r)| p == phase && r == "pool"))
}

fn qemu_count(dir: &Path) -> usize {
    qemu_processes(&dir.display().to_string()).len()
}

#[test]
fn a_pool_sandbox_serves_one_job_is_refilled_and_a_job_meanwhile_boots_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let repo = git_repo(dir.path());
    let daemon = daemon(dir.path(), 1, "");
    let pooled = wait_ready(&daemon, 1);
    assert_eq!(qemu_count(dir.path()), 1, "one VM for the pool");

    // Two at once: the first takes the READY sandbox, the second finds the pool empty.
    let job = |task: &str| {
        json!({
            "profile": "balanced",
            "task": task,
            "repo": repo.display().to_string(),
            "command": "cat hello.txt; mkdir -p out; hostname > out/host.txt",
            "artifacts": ["out/**"],
        })
    };
    let hit = daemon.submit(&job("hit"));
    let miss = daemon.submit(&job("miss"));
    let hit_job = daemon.wait_terminal(&hit, LIMIT);
    let miss_job = daemon.wait_terminal(&miss, LIMIT);
    let log = daemon.log();
    assert_eq!(hit_job["status"], "COMPLETED", "{hit_job}\n{log}");
    assert_eq!(miss_job["status"], "COMPLETED", "{miss_job}\n{log}");

    let sandbox = hit_job["sandbox_id"].as_str().unwrap().to_owned();
    assert!(pooled.contains(&sandbox), "{sandbox} from {pooled:?}");
    assert!(
        boot_phases_from_pool(&hit_job),
        "{:?}",
        phase_results(&hit_job)
    );
    let after: Vec<(String, String)> = phase_results(&hit_job)
        .into_iter()
        .filter(|(p, _)| ["run", "upload", "destroy"].contains(&p.as_str()))
        .collect();
    assert!(after.iter().all(|(_, r)| r == "ok"), "{after:?}");
    assert!(
        !phase_results(&miss_job).iter().any(|(_, r)| r == "pool"),
        "{:?}",
        phase_results(&miss_job)
    );
    assert_ne!(miss_job["sandbox_id"], hit_job["sandbox_id"]);
    let (_, events) = daemon.get(&format!("/v1/jobs/{hit}/events"));
    let text = events.to_string();
    assert!(
        text.contains(&format!("took sandbox {sandbox} from the balanced pool")),
        "{text}"
    );

    // The job on the pool sandbox ran in it with its own identity and checkout.
    let output = daemon.job_log(&hit);
    assert!(output.contains("hello from the host repo"), "{output}");
    let (_, listing) = daemon.get(&format!("/v1/jobs/{hit}/artifacts"));
    // Beside the result bundle (out/ was left uncommitted), the job's own artifact.
    let artifact = artifact_at(&listing, "out/host.txt");
    let bytes = daemon.get_bytes(&format!("/v1/jobs/{hit}/artifacts/out/host.txt"));
    assert_eq!(artifact["sha256"], hex::encode(Sha256::digest(&bytes)));
    assert_eq!(String::from_utf8_lossy(&bytes).trim(), sandbox);

    // Refilled with a new sandbox; the used one is gone.
    let refilled = wait_ready(&daemon, 1);
    assert!(!refilled.contains(&sandbox), "{refilled:?}");
    assert_eq!(qemu_count(dir.path()), 1, "only the refill runs");
    let counts = balanced(&daemon);
    assert_eq!(
        (counts["hits"].clone(), counts["misses"].clone()),
        (json!(1), json!(1))
    );
    // A SIGHUP that empties the pool takes effect without a restart.
    write_tuning(dir.path(), 0);
    daemon.signal("HUP");
    wait_empty(&daemon);
    assert_nothing_left(dir.path());
}

#[test]
fn a_daemon_killed_with_a_full_pool_and_a_job_just_claimed_leaks_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let guest = format!("guest_listen: 127.0.0.1:{}\n", free_port());
    let mut first = daemon(dir.path(), 2, &guest);
    let pooled = wait_ready(&first, 2);
    let id = first.submit(&json!({
        "profile": "balanced",
        "task": "claimed",
        "command": "echo ran-once",
    }));
    // Killed as soon as the claim is in the store: before the runner is started.
    let deadline = Instant::now() + LIMIT;
    let claimed = loop {
        let job = first.job(&id);
        if job["status"] == "RUNNING" {
            break job;
        }
        assert!(Instant::now() < deadline, "{}", first.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    first.kill9();
    drop(first);
    let sandbox = claimed["sandbox_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(pooled.contains(&sandbox), "{claimed}");

    let second = daemon(dir.path(), 2, &guest);
    let job = second.wait_terminal(&id, LIMIT);
    assert_eq!(job["status"], "COMPLETED", "{job}\n{}", second.log());
    assert!(boot_phases_from_pool(&job), "{:?}", phase_results(&job));
    assert_eq!(second.job_log(&id).matches("ran-once").count(), 1);

    // The other READY sandbox was adopted, the claimed one was never handed out again, and
    // the pool is full with exactly as many VMs as it lists.
    let now = wait_ready(&second, 2);
    assert!(!now.contains(&sandbox), "{now:?}");
    let adopted: Vec<&String> = pooled.iter().filter(|p| **p != sandbox).collect();
    assert!(
        now.contains(adopted[0]),
        "{adopted:?} kept in {now:?}\n{}",
        second.log()
    );
    assert_eq!(qemu_count(dir.path()), 2, "{now:?}");

    write_tuning(dir.path(), 0);
    second.signal("HUP");
    wait_empty(&second);
    assert_nothing_left(dir.path());
}

/// Waits until the pool lists no sandbox at all.
fn wait_empty(daemon: &Daemon) {
    let deadline = Instant::now() + LIMIT;
    while daemon.get("/v1/pool").1["sandboxes"] != json!([]) {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_budget_that_fits_only_the_pool_makes_the_pool_shrink_for_a_queued_job() {
    let dir = tempfile::tempdir().unwrap();
    // 2 cores × 0.5: one 1-vCPU sandbox at a time, which the pool's one sandbox already holds.
    write_tuning_with(dir.path(), 1, ", vcpus_per_core: 0.5");
    let daemon = start(dir.path(), "");
    let pooled = wait_ready(&daemon, 1);

    // Another profile: it cannot take the pool's sandbox, and waits for its vCPU.
    let id = daemon.submit(&json!({
        "profile": "high-throughput",
        "task": "needs the room",
        "command": "echo got-the-room",
    }));
    let job = daemon.wait_terminal(&id, LIMIT);
    let log = daemon.log();
    assert_eq!(job["status"], "COMPLETED", "{job}\n{log}");
    assert!(daemon.job_log(&id).contains("got-the-room"));
    assert!(
        !pooled.contains(job["sandbox_id"].as_str().unwrap_or_default()),
        "{job}"
    );
    assert!(
        log.contains("the host is short: destroying idle pool sandboxes"),
        "{log}"
    );

    // With nothing waiting, the pool fills again, with a new sandbox.
    let refilled = wait_ready(&daemon, 1);
    assert!(refilled.is_disjoint(&pooled), "{refilled:?} {pooled:?}");
    write_tuning_with(dir.path(), 0, ", vcpus_per_core: 0.5");
    daemon.signal("HUP");
    wait_empty(&daemon);
    assert_nothing_left(dir.path());
}

#[test]
fn a_pool_on_a_template_without_a_runner_fetches_the_daemons_and_shares_the_jobs_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let images = runnerless_images(dir.path());
    let runner = stripped_runner(dir.path());
    write_tuning(dir.path(), 1);
    let daemon = start_on(
        dir.path(),
        &images,
        &format!("runner_path: {}\n", runner.display()),
    );
    // READY means `agentlab-runner --version` ran in the guest: the template has none, so the
    // one there came from the daemon, fetched by the template VM of the snapshot the pool
    // sandbox's clone made, with the pool sandbox's own token.
    let pooled = wait_ready(&daemon, 1);
    let pool_id = pooled.iter().next().unwrap().clone();
    let log = daemon.log();
    assert!(
        log.lines()
            .any(|l| l.contains("a guest fetched the runner") && l.contains(&pool_id)),
        "no fetch by {pool_id}:\n{log}"
    );
    let made = snapshot_ids(dir.path());
    assert_eq!(made.len(), 1, "{made:?}");

    // Two at once: the first takes the pool sandbox, the second boots its own from the same
    // snapshot, which only a job spec of the same shape as the pool's finds.
    let job = |task: &str| {
        json!({
            "profile": "balanced", "task": task,
            "command": "agentlab-runner --version; echo ran-with-the-daemons-runner",
        })
    };
    let hit = daemon.submit(&job("hit"));
    let miss = daemon.submit(&job("miss"));
    let hit_job = daemon.wait_terminal(&hit, LIMIT);
    let miss_job = daemon.wait_terminal(&miss, LIMIT);
    let log = daemon.log();
    assert_eq!(hit_job["status"], "COMPLETED", "{hit_job}\n{log}");
    assert_eq!(miss_job["status"], "COMPLETED", "{miss_job}\n{log}");
    assert_eq!(hit_job["sandbox_id"], pool_id.as_str(), "{hit_job}");
    assert!(
        boot_phases_from_pool(&hit_job),
        "{:?}",
        phase_results(&hit_job)
    );
    for (id, job) in [(&hit, &hit_job), (&miss, &miss_job)] {
        let output = daemon.job_log(id);
        assert!(output.contains("ran-with-the-daemons-runner"), "{output}");
        assert_eq!(job["start_method"], "restored", "{job}");
        assert_eq!(job["snapshot_id"], made[0].as_str(), "{job}");
    }
    assert_eq!(snapshot_ids(dir.path()), made, "no second snapshot");

    write_tuning(dir.path(), 0);
    daemon.signal("HUP");
    wait_empty(&daemon);
    assert_nothing_left(dir.path());
}
