//! The lifecycle on the fake backend: the happy path, each phase's failure and timeout, cancels,
//! the restart policy under injected panics, and recovery after the daemon dies (leases are in
//! leases_fake.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use agentlab::actors::supervisor::{CancelJob, Reconcile, Shutdown};
use agentlab::backend::fake::{FakeConfig, FakeOp, Fault};
use agentlab::model::{sandbox_name_for, JobStatus, Phase, SandboxState};
use common::{request, run_paused, short_tuning, slow_run, Harness};

fn faulty(op: FakeOp, fault: Fault) -> FakeConfig {
    FakeConfig {
        faults: BTreeMap::from([(op, fault)]),
        ..FakeConfig::default()
    }
}

fn fail() -> Fault {
    Fault {
        fail_rate: 1.0,
        ..Fault::default()
    }
}

fn hang() -> Fault {
    Fault {
        hang: true,
        ..Fault::default()
    }
}

#[test]
fn happy_path_runs_every_phase_in_order_and_leaves_nothing() {
    run_paused(async {
        let h = Harness::start(FakeConfig::default(), short_tuning(), None);
        let id = h.submit(request()).await;
        let job = h.wait_terminal(&id).await;
        assert_eq!(job.status, JobStatus::Completed, "{job:?}");
        assert_eq!(job.exit_code, Some(0));
        let phases: Vec<Phase> = job.phases.iter().map(|p| p.phase).collect();
        assert_eq!(phases, Phase::ALL.to_vec());
        assert!(
            job.phases.iter().all(|p| p.result.as_deref() == Some("ok")),
            "{:?}",
            job.phases
        );
        assert_eq!(h.sandbox_state(&id).await, SandboxState::Destroyed);
        assert!(h.fake.vm_names().is_empty());
        assert_eq!(h.fake.creations(&sandbox_name_for(&id)), 1);
    });
}

#[test]
fn a_failing_command_fails_the_job_with_its_exit_code() {
    run_paused(async {
        let config = FakeConfig {
            exit_code: 3,
            ..FakeConfig::default()
        };
        let h = Harness::start(config, short_tuning(), None);
        let id = h.submit(request()).await;
        let job = h.wait_terminal(&id).await;
        assert_eq!((job.status, job.exit_code), (JobStatus::Failed, Some(3)));
        assert!(job.error.unwrap().contains("exited with code 3"));
        assert!(h.fake.vm_names().is_empty());
    });
}

/// The fake operation that makes each phase fail or hang.
const PHASE_FAULTS: [(Phase, FakeOp); 6] = [
    (Phase::Clone, FakeOp::Clone),
    (Phase::Start, FakeOp::Start),
    (Phase::CloudInit, FakeOp::Boot),
    (Phase::GuestAgent, FakeOp::AgentPing),
    (Phase::Run, FakeOp::Run),
    (Phase::Upload, FakeOp::Upload),
];

#[test]
fn each_phase_failure_ends_the_job_failed_naming_the_phase_with_the_vm_destroyed() {
    for (phase, op) in PHASE_FAULTS {
        run_paused(async {
            let h = Harness::start(faulty(op, fail()), short_tuning(), None);
            let id = h.submit(request()).await;
            let job = h.wait_terminal(&id).await;
            assert_eq!(job.status, JobStatus::Failed, "{phase}: {job:?}");
            let error = job.error.clone().unwrap();
            assert!(
                error.contains(&format!("phase {phase} failed")),
                "{phase}: {error}"
            );
            let failed = job.phases.iter().find(|p| p.phase == phase).unwrap();
            assert_eq!(failed.result.as_deref(), Some("failed"));
            assert_eq!(job.phases.last().unwrap().phase, Phase::Destroy);
            assert!(h.fake.vm_names().is_empty(), "{phase}: VM left behind");
            assert_eq!(h.sandbox_state(&id).await, SandboxState::Destroyed);
        });
    }
}

#[test]
fn each_phase_timeout_ends_the_job_timeout_naming_the_phase_with_the_vm_destroyed() {
    for (phase, op) in PHASE_FAULTS {
        run_paused(async {
            let h = Harness::start(faulty(op, hang()), short_tuning(), None);
            let id = h.submit(request()).await;
            let job = h.wait_terminal(&id).await;
            assert_eq!(job.status, JobStatus::Timeout, "{phase}: {job:?}");
            let error = job.error.clone().unwrap();
            assert!(
                error.contains(&format!("phase {phase} timed out")),
                "{phase}: {error}"
            );
            assert!(h.fake.vm_names().is_empty(), "{phase}: VM left behind");
            assert_eq!(h.sandbox_state(&id).await, SandboxState::Destroyed);
        });
    }
}

#[test]
fn a_failed_destroy_is_retried_by_the_reconciler() {
    run_paused(async {
        let h = Harness::start(
            faulty(
                FakeOp::Destroy,
                Fault {
                    fail_times: 1,
                    ..Fault::default()
                },
            ),
            short_tuning(),
            None,
        );
        let id = h.submit(request()).await;
        let job = h.wait_terminal(&id).await;
        assert_eq!(
            job.status,
            JobStatus::Completed,
            "the command's result stands"
        );
        assert_eq!(job.phases.last().unwrap().result.as_deref(), Some("failed"));
        assert_eq!(h.sandbox_state(&id).await, SandboxState::Destroying);
        assert_eq!(h.fake.vm_names().len(), 1);
        h.supervisor.send(Reconcile).await.unwrap();
        // The reconcile's store work runs on the blocking pool, which paused time does not wait
        // for: look until it is done (each look is a store call of its own) rather than sleep.
        let mut state = h.sandbox_state(&id).await;
        for _ in 0..600 {
            if state == SandboxState::Destroyed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            state = h.sandbox_state(&id).await;
        }
        assert_eq!(state, SandboxState::Destroyed);
        assert!(h.fake.vm_names().is_empty());
    });
}

#[test]
fn a_hanging_destroy_times_out_and_the_job_still_ends() {
    run_paused(async {
        let h = Harness::start(faulty(FakeOp::Destroy, hang()), short_tuning(), None);
        let id = h.submit(request()).await;
        let job = h.wait_terminal(&id).await;
        assert_eq!(job.status, JobStatus::Completed);
        let name = sandbox_name_for(&id);
        let sandbox = h
            .svc
            .store
            .call(move |s| s.get_sandbox(&name))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sandbox.state, SandboxState::Destroying);
        assert!(sandbox.error.unwrap().contains("timed out"));
    });
}

#[test]
fn an_injected_panic_restarts_the_actor_without_a_second_clone() {
    run_paused(async {
        let h = Harness::start(
            faulty(
                FakeOp::Start,
                Fault {
                    panic_times: 1,
                    ..Fault::default()
                },
            ),
            short_tuning(),
            None,
        );
        let id = h.submit(request()).await;
        let job = h.wait_terminal(&id).await;
        assert_eq!(job.status, JobStatus::Completed, "{job:?}");
        assert_eq!(job.restarts, 1);
        assert_eq!(
            h.fake.calls(FakeOp::Clone),
            1,
            "the restarted actor must resume, not re-clone"
        );
        assert_eq!(h.fake.creations(&sandbox_name_for(&id)), 1);
        assert!(h.fake.vm_names().is_empty());
    });
}

#[test]
fn panics_past_the_restart_limit_fail_the_job_and_destroy_the_vm() {
    run_paused(async {
        let h = Harness::start(
            faulty(
                FakeOp::AgentPing,
                Fault {
                    panic_times: 100,
                    ..Fault::default()
                },
            ),
            short_tuning(),
            None,
        );
        let id = h.submit(request()).await;
        let job = h.wait_terminal(&id).await;
        assert_eq!(job.status, JobStatus::Failed);
        assert!(job.error.unwrap().contains("crashed 4 times"));
        assert_eq!(job.restarts, 3);
        assert_eq!(h.fake.creations(&sandbox_name_for(&id)), 1);
        assert!(h.fake.vm_names().is_empty());
        assert_eq!(h.sandbox_state(&id).await, SandboxState::Destroyed);
    });
}

#[test]
fn cancelling_a_running_job_destroys_its_vm() {
    run_paused(async {
        let config = slow_run(Duration::from_millis(600_000));
        let h = Harness::start(config, short_tuning(), None);
        let id = h.submit(request()).await;
        h.wait_phase(&id, Phase::Run).await;
        let cancel = CancelJob {
            job_id: id.clone(),
            status: JobStatus::Cancelled,
            reason: "by request".into(),
        };
        assert!(h.supervisor.send(cancel).await.unwrap().unwrap());
        let job = h.wait_terminal(&id).await;
        assert_eq!(job.status, JobStatus::Cancelled);
        assert!(job.error.unwrap().contains("during phase run"));
        assert!(h.fake.vm_names().is_empty());
    });
}

#[test]
fn a_vm_that_now_carries_another_daemons_id_is_never_destroyed() {
    run_paused(async {
        let h = Harness::start(
            slow_run(Duration::from_millis(600_000)),
            short_tuning(),
            None,
        );
        let id = h.submit(request()).await;
        h.wait_phase(&id, Phase::Run).await;
        // Another daemon on the host took the VM over (its id is on it now).
        let name = sandbox_name_for(&id);
        h.fake.insert_vm(&name, Some("0000-another-daemon"));
        let cancel = CancelJob {
            job_id: id.clone(),
            status: JobStatus::Cancelled,
            reason: "by request".into(),
        };
        assert!(h.supervisor.send(cancel).await.unwrap().unwrap());
        assert_eq!(h.wait_terminal(&id).await.status, JobStatus::Cancelled);
        assert_eq!(h.fake.vm_names(), std::slice::from_ref(&name), "left alone");
        assert_eq!(h.sandbox_state(&id).await, SandboxState::Destroyed);
        // No longer ours: the reconciler reports it as foreign and still leaves it.
        h.supervisor.send(Reconcile).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let foreign = h.svc.instance.foreign();
        assert_eq!(foreign.len(), 1, "{foreign:?}");
        assert_eq!(foreign[0].name, name);
        assert_eq!(foreign[0].owner.as_deref(), Some("0000-another-daemon"));
        assert_eq!(h.fake.vm_names(), [name]);
    });
}

#[test]
fn cancelling_a_queued_job_ends_it_without_a_vm() {
    run_paused(async {
        let mut tuning = short_tuning();
        tuning.admission.max_concurrent = 1;
        let config = slow_run(Duration::from_millis(60_000));
        let h = Harness::start(config, tuning, None);
        let first = h.submit(request()).await;
        let second = h.submit(request()).await;
        h.wait_phase(&first, Phase::Run).await;
        assert_eq!(h.job(&second).await.queue_position, Some(1));
        let cancel = CancelJob {
            job_id: second.clone(),
            status: JobStatus::Cancelled,
            reason: "by request".into(),
        };
        assert!(h.supervisor.send(cancel).await.unwrap().unwrap());
        assert_eq!(h.job(&second).await.status, JobStatus::Cancelled);
        assert_eq!(h.wait_terminal(&first).await.status, JobStatus::Completed);
        assert_eq!(h.fake.creations(&sandbox_name_for(&second)), 0);
    });
}

#[test]
fn graceful_shutdown_suspends_running_jobs_for_the_next_start() {
    run_paused(async {
        let config = slow_run(Duration::from_millis(600_000));
        let h = Harness::start(config, short_tuning(), None);
        let id = h.submit(request()).await;
        h.wait_phase(&id, Phase::Run).await;
        h.supervisor.send(Shutdown).await.unwrap();
        let job = h.job(&id).await;
        assert_eq!(
            job.status,
            JobStatus::Running,
            "a suspended job resumes at the next start"
        );
        assert_eq!(
            h.fake.vm_names().len(),
            1,
            "suspending must not destroy the VM"
        );
    });
}

#[test]
fn after_the_daemon_dies_the_next_start_reconciles_every_job_and_vm() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("agentlab.db");
    let state = dir.path().join("fake-vms.json");
    let config = FakeConfig {
        state_file: Some(state.clone()),
        ..slow_run(Duration::from_millis(600_000))
    };
    let (running, queued) = run_paused({
        let config = config.clone();
        let db = db.clone();
        async move {
            let mut tuning = short_tuning();
            tuning.admission.max_concurrent = 1;
            let h = Harness::start(config, tuning, Some(&db));
            let running = h.submit(request()).await;
            let queued = h.submit(request()).await;
            h.wait_phase(&running, Phase::Run).await;
            // The system is dropped mid-run with no shutdown at all: as if killed.
            (running, queued)
        }
    });
    // A VM of ours the store never knew, and two under our prefix that are not ours: one of
    // another daemon's, one made by hand (no owner).
    let mut vms: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    vms["sandbox-orphan00000"] =
        serde_json::json!({"job_id": "nobody", "running": true, "owner": common::TEST_INSTANCE});
    vms["sandbox-theirs00000"] =
        serde_json::json!({"job_id": "nobody", "running": true, "owner": "0000-another-daemon"});
    vms["sandbox-byhand00000"] = serde_json::json!({"job_id": "nobody", "running": true});
    std::fs::write(&state, vms.to_string()).unwrap();

    run_paused(async move {
        let h = Harness::start(
            FakeConfig {
                latency: BTreeMap::new(),
                ..config
            },
            short_tuning(),
            Some(&db),
        );
        let resumed = h.wait_terminal(&running).await;
        // The simulated runner died with the old process, so the resumed run phase fails cleanly.
        assert_eq!(resumed.status, JobStatus::Failed, "{resumed:?}");
        assert!(resumed.error.unwrap().contains("phase run failed"));
        assert_eq!(h.wait_terminal(&queued).await.status, JobStatus::Completed);
        assert_eq!(
            h.fake.vm_names(),
            ["sandbox-byhand00000", "sandbox-theirs00000"],
            "ours leaked, or theirs were destroyed"
        );
        let open = h.svc.store.call(|s| s.running_jobs()).await.unwrap();
        assert!(open.is_empty());
    });
}

#[test]
fn a_crash_during_guest_exec_never_starts_a_second_runner() {
    run_paused(async {
        // The exec call panics: the restarted actor cannot know whether a runner started, so it
        // follows the guest's reports instead of starting another; none come, and the run phase
        // times out with the VM destroyed.
        let h = Harness::start(
            faulty(
                FakeOp::Exec,
                Fault {
                    panic_times: 1,
                    ..Fault::default()
                },
            ),
            short_tuning(),
            None,
        );
        let id = h.submit(request()).await;
        let job = h.wait_terminal(&id).await;
        assert_eq!(job.status, JobStatus::Timeout, "{job:?}");
        assert!(job.error.unwrap().contains("phase run timed out"));
        assert_eq!(h.fake.calls(FakeOp::Exec), 1, "a second runner was started");
        assert!(h.fake.vm_names().is_empty());
    });
}

#[test]
fn reconciling_while_admitting_never_gives_a_job_two_actors() {
    run_paused(async {
        let h = Harness::start(FakeConfig::default(), short_tuning(), None);
        let mut ids = Vec::new();
        for _ in 0..30 {
            ids.push(h.submit(request()).await);
            // Reconciliation finds freshly admitted jobs RUNNING before their actor exists.
            h.supervisor.do_send(Reconcile);
        }
        for id in &ids {
            let job = h.wait_terminal(id).await;
            assert_eq!(job.status, JobStatus::Completed, "{job:?}");
            let phases: Vec<Phase> = job.phases.iter().map(|p| p.phase).collect();
            assert_eq!(
                phases,
                Phase::ALL.to_vec(),
                "a phase ran twice: {:?}",
                job.phases
            );
        }
        assert_eq!(h.fake.calls(FakeOp::Clone), 30);
    });
}
