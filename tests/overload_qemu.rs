//! The overload the ResourceGovernor exists for, with real VMs: eight jobs submitted at once to the
//! local QEMU backend (TCG) on a small host, where each boot phase must finish within 15 s. Eight
//! concurrent TCG boots take 25-28 s on a 2-core host, so without admission control most of them
//! time out. With the governor on, all eight must complete; with it off (`governor: off`), the
//! test records how many fail. Both runs print a table (job, status, queue time, boot time, total)
//! and write it to `target/overload-qemu.md`.
//!
//! In this lifecycle the guest agent is up before the guest phones home, so the boot's wait is in
//! `cloud_init`; both `cloud_init` and `guest_agent` get the 15 s timeout.
//!
//! It needs the guest template (`scripts/build-guest-image.sh`; `AGENTLAB_TEST_IMAGES` says where
//! it is) and fails without it. About two minutes on a 2-core host.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::{repo_dir, Daemon};
use common::vm::images;
use serde_json::{json, Value};

const JOBS: usize = 8;

/// Boot phases get 15 s; the disk rule is off (the VMs' qcow2 overlays are thin and tiny, and the
/// machine's disk may be fuller than the rule allows); up to eight sandboxes may be alive.
fn tuning(governor: &str) -> String {
    format!(
        "phase_timeouts: {{cloud_init: 15s, guest_agent: 15s, run: 60s, upload: 30s, destroy: 30s}}\n\
         intervals: {{guest_poll: 250ms, reconcile: 5s}}\n\
         admission: {{max_concurrent: {JOBS}}}\n\
         {governor}\n"
    )
}

fn daemon(dir: &Path, tuning: &str) -> Daemon {
    std::fs::create_dir_all(dir.join("tuning")).unwrap();
    std::fs::write(dir.join("tuning/default.yaml"), tuning).unwrap();
    let qemu = format!(
        "qemu:\n  images_dir: {}\n  accel: tcg\n  memory_mb_cap: 256\n  cores_cap: 1\n",
        images().display()
    );
    Daemon::start(dir, "qemu", &qemu)
}

/// One job's figures, seconds.
struct Figures {
    status: String,
    queue: f64,
    boot: f64,
    total: f64,
    error: String,
}

fn figures(job: &Value) -> Figures {
    let ms = |key: &str| job[key].as_i64().unwrap_or(0);
    let boot: f64 = job["phases"]
        .as_array()
        .map(|phases| {
            phases
                .iter()
                .filter(|p| {
                    ["clone", "start", "cloud_init", "guest_agent"]
                        .contains(&p["phase"].as_str().unwrap_or(""))
                })
                .filter_map(|p| p["duration_seconds"].as_f64())
                .sum()
        })
        .unwrap_or(0.0);
    Figures {
        status: job["status"].as_str().unwrap_or("?").to_owned(),
        queue: (ms("started_at_ms") - ms("created_at_ms")).max(0) as f64 / 1000.0,
        boot,
        total: (ms("finished_at_ms") - ms("created_at_ms")).max(0) as f64 / 1000.0,
        error: job["error"].as_str().unwrap_or("").to_owned(),
    }
}

/// Submits JOBS jobs at once and waits for all; returns their figures, the wall time, and the
/// governor's final answer.
fn overload(dir: &Path, governor: &str) -> (Vec<Figures>, f64, Value) {
    let daemon = daemon(dir, &tuning(governor));
    let started = Instant::now();
    let ids: Vec<String> = (0..JOBS)
        .map(|i| {
            daemon.submit(&json!({
                "profile": "balanced",
                "task": format!("overload {i}"),
                "command": "echo done",
            }))
        })
        .collect();
    let jobs: Vec<Value> = ids
        .iter()
        .map(|id| daemon.wait_terminal(id, Duration::from_secs(600)))
        .collect();
    let wall = started.elapsed().as_secs_f64();
    let status = daemon.get("/v1/governor").1;
    (jobs.iter().map(figures).collect(), wall, status)
}

fn table(title: &str, rows: &[Figures], wall: f64, governor: &Value) -> String {
    let ok = rows.iter().filter(|r| r.status == "COMPLETED").count();
    let mut out = format!(
        "### {title}\n\n{ok} of {} completed ({:.0}%), all done in {wall:.1} s. \
         Boot cap at the end: {} (cap {:.2}); boots on time {}, slow {}, timed out {}.\n\n\
         | job | status | queue s | boot s | total s | error |\n|---|---|---|---|---|---|\n",
        rows.len(),
        ok as f64 * 100.0 / rows.len() as f64,
        governor["boot_cap"]["limit"],
        governor["boot_cap"]["cap"].as_f64().unwrap_or(0.0),
        governor["boot_cap"]["on_time"],
        governor["boot_cap"]["slow"],
        governor["boot_cap"]["timeouts"],
    );
    for (i, r) in rows.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {} |",
            i + 1,
            r.status,
            r.queue,
            r.boot,
            r.total,
            r.error
        );
    }
    out
}

#[test]
fn eight_jobs_at_once_all_complete_with_the_governor_and_fail_without() {
    images();
    let base = repo_dir().join("target/overload-qemu");
    std::fs::create_dir_all(&base).unwrap();

    let on_dir = tempfile::tempdir_in(&base).unwrap();
    let (on, on_wall, on_status) = overload(
        on_dir.path(),
        "governor: {budget: {disk_min_free_percent: null}}",
    );
    let off_dir = tempfile::tempdir_in(&base).unwrap();
    let (off, off_wall, off_status) = overload(off_dir.path(), "governor: off");

    let report = format!(
        "{}\n{}",
        table("Governor on", &on, on_wall, &on_status),
        table("Governor off", &off, off_wall, &off_status)
    );
    eprintln!("{report}");
    std::fs::write(repo_dir().join("target/overload-qemu.md"), &report).unwrap();

    let failed_on: Vec<&Figures> = on.iter().filter(|r| r.status != "COMPLETED").collect();
    assert!(
        failed_on.is_empty(),
        "with the governor on every job must complete:\n{report}"
    );
}
