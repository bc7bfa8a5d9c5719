//! What must hold across crashes and daemon restarts, on the fake backend with paused time: the
//! restart policy counts crashes kept in the store (a daemon that dies under a job counts as a
//! crash of it), a resumed phase keeps its deadline, and `admission.max_concurrent` is a ceiling
//! over every live VM (kept sandboxes, failed destroys, jobs not resumed yet), with nothing
//! admitted before the start-up reconcile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use agentlab::actors::supervisor::{DestroySandbox, IsReady, Shutdown};
use agentlab::backend::fake::{FakeConfig, FakeOp, Fault, Latency};
use agentlab::config::tuning::Tuning;
use agentlab::model::{sandbox_name_for, Event, JobRequest, JobStatus, Phase, SandboxState};
use agentlab::store::Store;
use common::{request, run_paused, short_tuning, slow_run, Harness};

/// The simulated guest never phones home: the job sits in cloud_init.
fn boot_hangs(state: &Path) -> FakeConfig {
    FakeConfig {
        faults: BTreeMap::from([(
            FakeOp::Boot,
            Fault {
                hang: true,
                ..Fault::default()
            },
        )]),
        state_file: Some(state.to_owned()),
        ..FakeConfig::default()
    }
}

/// Waits (in virtual time) until the job has begun `phase` `times` times.
async fn wait_phase_runs(h: &Harness, id: &str, phase: Phase, times: usize) {
    for _ in 0..100_000 {
        let job = h.job(id).await;
        let runs = job.phases.iter().filter(|p| p.phase == phase).count();
        if runs >= times {
            return;
        }
        assert!(!job.status.is_terminal(), "ended early: {job:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("job {id} never began {phase} {times} times");
}

/// How the daemon that began a job stops.
#[derive(Clone, Copy)]
enum Stop {
    /// Dropped mid-phase without a shutdown: as if killed.
    Killed,
    /// A graceful shutdown (SIGTERM) first.
    Graceful,
}

/// A daemon on `db` takes a new job into cloud_init (where `boot_hangs` holds it) and stops.
/// Returns the job's id.
fn first_daemon_leaves_a_job_in_cloud_init(
    config: &FakeConfig,
    tuning: &Tuning,
    db: &Path,
    stop: Stop,
) -> String {
    let (config, tuning, db) = (config.clone(), tuning.clone(), db.to_owned());
    run_paused(async move {
        let h = Harness::start(config, tuning, Some(&db));
        let id = h.submit(request()).await;
        wait_phase_runs(&h, &id, Phase::CloudInit, 1).await;
        if let Stop::Graceful = stop {
            h.supervisor.send(Shutdown).await.unwrap();
        }
        id
    })
}

fn events(db: &Path, job_id: &str) -> Vec<Event> {
    Store::open(db)
        .unwrap()
        .events_after(job_id, 0, 10_000)
        .unwrap()
}

#[test]
fn a_daemon_that_keeps_dying_under_a_job_ends_it_at_the_restart_limit() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("agentlab.db");
    let config = boot_hangs(&dir.path().join("fake-vms.json"));
    let id = first_daemon_leaves_a_job_in_cloud_init(&config, &short_tuning(), &db, Stop::Killed);
    // The default policy allows 3 restarts in 10 minutes. Each start finds the job interrupted,
    // counts a crash and resumes it; in memory alone the count would start at 0 every time.
    for start in 1..=3 {
        run_paused({
            let (config, db, id) = (config.clone(), db.clone(), id.clone());
            async move {
                let h = Harness::start(config, short_tuning(), Some(&db));
                wait_phase_runs(&h, &id, Phase::CloudInit, start + 1).await;
                let job = h.job(&id).await;
                assert_eq!(job.status, JobStatus::Running);
                assert_eq!(job.restarts, u32::try_from(start).unwrap());
            }
        });
    }
    run_paused(async move {
        let h = Harness::start(config, short_tuning(), Some(&db));
        let job = h.wait_terminal(&id).await;
        assert_eq!(job.status, JobStatus::Failed, "{job:?}");
        let error = job.error.unwrap();
        assert!(error.contains("crashed 4 times"), "{error}");
        assert!(
            error.contains("the daemon stopped while the job ran"),
            "{error}"
        );
        assert!(h.fake.vm_names().is_empty(), "{:?}", h.fake.vm_names());
        assert_eq!(h.sandbox_state(&id).await, SandboxState::Destroyed);
        assert_eq!(
            h.fake.creations(&sandbox_name_for(&id)),
            0,
            "never cloned again"
        );
    });
}

#[test]
fn a_job_suspended_by_a_graceful_shutdown_resumes_without_counting_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("agentlab.db");
    let config = boot_hangs(&dir.path().join("fake-vms.json"));
    let id = first_daemon_leaves_a_job_in_cloud_init(&config, &short_tuning(), &db, Stop::Graceful);
    run_paused({
        let (db, id) = (db.clone(), id.clone());
        async move {
            let h = Harness::start(config, short_tuning(), Some(&db));
            wait_phase_runs(&h, &id, Phase::CloudInit, 2).await;
            let job = h.job(&id).await;
            assert_eq!((job.status, job.restarts), (JobStatus::Running, 0));
        }
    });
    assert!(
        !events(&db, &id).iter().any(|e| e.kind == "restart"),
        "a clean suspend is not a crash"
    );
}

#[test]
fn a_phase_resumed_after_a_crash_keeps_its_deadline() {
    run_paused(async {
        // The command runs 700 s; the run phase may take 600 s. The actor crashes ~100 s into the
        // run (the 100th look at the runner); the resumed phase must end at 600 s, not 700 s
        // (completed) or 700+ s (a fresh 600 s after the crash).
        let config = FakeConfig {
            faults: BTreeMap::from([(
                FakeOp::ExecStatus,
                Fault {
                    panic_on_call: 100,
                    ..Fault::default()
                },
            )]),
            ..slow_run(Duration::from_secs(700))
        };
        let mut tuning = short_tuning();
        tuning.phase_timeouts.run = Duration::from_secs(600);
        let h = Harness::start(config, tuning, None);
        let id = h.submit(request()).await;
        h.wait_phase(&id, Phase::Run).await;
        let run_began = tokio::time::Instant::now();
        let job = h.wait_terminal(&id).await;
        let run_took = run_began.elapsed();
        assert_eq!(job.status, JobStatus::Timeout, "{job:?}");
        assert_eq!(job.restarts, 1, "{job:?}");
        assert!(job.error.unwrap().contains("phase run timed out after 10m"));
        assert!(
            run_took < Duration::from_secs(650),
            "the resumed run phase got a fresh timeout: it ended {run_took:?} after it began"
        );
    });
}

fn kept_request() -> JobRequest {
    JobRequest {
        profile: "interactive-dev".into(),
        ..request()
    }
}

#[test]
fn a_kept_sandbox_holds_a_slot_until_it_is_destroyed() {
    run_paused(async {
        let mut tuning = short_tuning();
        tuning.admission.max_concurrent = 1;
        let h = Harness::start(FakeConfig::default(), tuning, None);
        let kept = h.submit(kept_request()).await;
        assert_eq!(h.wait_terminal(&kept).await.status, JobStatus::Completed);
        assert_eq!(h.sandbox_state(&kept).await, SandboxState::Kept);

        let next = h.submit(request()).await;
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(
            h.job(&next).await.status,
            JobStatus::Queued,
            "admitted past max_concurrent while a kept sandbox lives"
        );
        h.supervisor
            .send(DestroySandbox {
                sandbox_id: sandbox_name_for(&kept),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(h.wait_terminal(&next).await.status, JobStatus::Completed);
        assert_eq!(h.sandbox_state(&kept).await, SandboxState::Destroyed);
        assert!(h.fake.vm_names().is_empty());
    });
}

#[test]
fn a_sandbox_whose_destroy_failed_holds_a_slot_until_the_retry_destroys_it() {
    run_paused(async {
        let mut tuning = short_tuning();
        tuning.admission.max_concurrent = 1;
        let config = FakeConfig {
            faults: BTreeMap::from([(
                FakeOp::Destroy,
                Fault {
                    fail_times: 1,
                    ..Fault::default()
                },
            )]),
            ..FakeConfig::default()
        };
        let h = Harness::start(config, tuning, None);
        let first = h.submit(request()).await;
        let second = h.submit(request()).await;
        assert_eq!(h.wait_terminal(&first).await.status, JobStatus::Completed);
        assert_eq!(h.sandbox_state(&first).await, SandboxState::Destroying);
        // Until the reconciler's retry destroys the first VM, the second job may not start.
        loop {
            let job = h.job(&second).await;
            if job.status != JobStatus::Queued {
                assert_eq!(
                    h.sandbox_state(&first).await,
                    SandboxState::Destroyed,
                    "the second job started while the first VM was still there"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(h.wait_terminal(&second).await.status, JobStatus::Completed);
    });
}

#[test]
fn a_job_not_yet_resumed_after_a_restart_holds_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("agentlab.db");
    let config = boot_hangs(&dir.path().join("fake-vms.json"));
    let mut tuning = short_tuning();
    tuning.admission.max_concurrent = 1;
    // A long backoff: the interrupted job waits 60 s without an actor before it resumes.
    tuning.restart.backoff_initial = Duration::from_secs(60);
    tuning.restart.backoff_max = Duration::from_secs(60);
    let first = first_daemon_leaves_a_job_in_cloud_init(&config, &tuning, &db, Stop::Killed);
    run_paused(async move {
        let h = Harness::start(config, tuning, Some(&db));
        let second = h.submit(request()).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(h.job(&first).await.status, JobStatus::Running);
        assert_eq!(
            h.job(&second).await.status,
            JobStatus::Queued,
            "admitted while an interrupted job waited to resume"
        );
        assert!(h.supervisor.send(IsReady).await.unwrap());
    });
}

#[test]
fn nothing_is_admitted_before_the_start_up_reconcile_removed_what_it_must() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("agentlab.db");
    let state = dir.path().join("fake-vms.json");
    // A VM under our prefix that the store does not know, left by a daemon that died.
    std::fs::write(
        &state,
        serde_json::json!({"sandbox-orphan00000": {
            "job_id": "nobody", "running": true, "owner": common::TEST_INSTANCE
        }})
        .to_string(),
    )
    .unwrap();
    run_paused(async move {
        let mut tuning = short_tuning();
        tuning.admission.max_concurrent = 1;
        // Destroying the orphan takes 20 s: a job admitted before the reconcile finished would
        // be cloned while it still runs.
        let config = FakeConfig {
            latency: BTreeMap::from([(
                FakeOp::Destroy,
                Latency {
                    min_ms: 20_000,
                    max_ms: 20_000,
                },
            )]),
            state_file: Some(state),
            ..FakeConfig::default()
        };
        let h = Harness::start(config, tuning, Some(&db));
        let id = h.submit(request()).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!h.supervisor.send(IsReady).await.unwrap());
        assert_eq!(h.job(&id).await.status, JobStatus::Queued);
        let job = h.wait_terminal(&id).await;
        assert_eq!(job.status, JobStatus::Completed);
        assert_eq!(
            h.fake.creations("sandbox-orphan00000"),
            0,
            "the orphan is destroyed, never made"
        );
        assert!(h.fake.vm_names().is_empty(), "{:?}", h.fake.vm_names());
    });
}

#[test]
fn a_shutdown_during_a_restart_backoff_does_not_count_the_crash_twice() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("agentlab.db");
    let config = boot_hangs(&dir.path().join("fake-vms.json"));
    let mut tuning = short_tuning();
    tuning.restart.backoff_initial = Duration::from_secs(60);
    tuning.restart.backoff_max = Duration::from_secs(60);
    let id = first_daemon_leaves_a_job_in_cloud_init(&config, &tuning, &db, Stop::Killed);
    // The next daemon counts the interruption as crash 1 and is shut down cleanly while the
    // job waits out its backoff.
    run_paused({
        let (config, db, tuning, id) = (config.clone(), db.clone(), tuning.clone(), id.clone());
        async move {
            let h = Harness::start(config, tuning, Some(&db));
            for _ in 0..1000 {
                if h.job(&id).await.restarts == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(h.job(&id).await.restarts, 1);
            h.supervisor.send(Shutdown).await.unwrap();
        }
    });
    run_paused(async move {
        let h = Harness::start(config, tuning, Some(&db));
        wait_phase_runs(&h, &id, Phase::CloudInit, 2).await;
        assert_eq!(
            h.job(&id).await.restarts,
            1,
            "the clean stop was counted as a crash"
        );
    });
}
