//! Leases and retention on the fake backend, in paused time: a lease starts when a sandbox is kept
//! and never stops a running job; a renew while the job runs becomes its lease; the retention
//! collector removes an old job's rows and files and leaves recent and running ones alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use actix::Actor;
use agentlab::actors::retention::RetentionCollector;
use agentlab::actors::supervisor::CancelJob;
use agentlab::config::Config;
use agentlab::model::{sandbox_name_for, Artifact, JobRequest, JobStatus, Phase, SandboxState};
use agentlab::store::LeaseRenewal;
use common::{host, request, run_paused, short_tuning, slow_run, Harness};

const MINUTE: Duration = Duration::from_secs(60);

/// A job on the keepalive profile, with a lease of `ttl_minutes` once kept.
fn kept_request(ttl_minutes: u32) -> JobRequest {
    JobRequest {
        profile: "interactive-dev".into(),
        ttl_minutes: Some(ttl_minutes),
        ..request()
    }
}

#[test]
fn a_lease_shorter_than_the_job_does_not_stop_it_and_ends_the_kept_sandbox_after() {
    run_paused(async {
        let mut tuning = short_tuning();
        tuning.phase_timeouts.run = Duration::from_secs(7200);
        let h = Harness::start(slow_run(Duration::from_secs(3600)), tuning, None);
        let id = h.submit(kept_request(1)).await;

        let job = h.wait_terminal(&id).await;
        assert_eq!(job.status, JobStatus::Completed, "{job:?}");
        let kept_at = h.svc.clock.now_ms();
        let name = sandbox_name_for(&id);
        let lookup = name.clone();
        let sandbox = h
            .svc
            .store
            .call(move |s| s.get_sandbox(&lookup))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sandbox.state, SandboxState::Kept);
        // The lease runs from when the job ended, not from when it was created an hour before.
        assert!(
            (sandbox.lease_expires_at_ms - (kept_at + 60_000)).abs() < 5_000,
            "lease {} vs kept at {kept_at}",
            sandbox.lease_expires_at_ms
        );
        assert_eq!(h.fake.vm_names(), vec![name.clone()]);

        // The collector (every 30 s) destroys it once the minute is over.
        tokio::time::sleep(2 * MINUTE).await;
        assert_eq!(h.sandbox_state(&id).await, SandboxState::Destroyed);
        assert!(h.fake.vm_names().is_empty());
    });
}

#[test]
fn a_renew_while_the_job_runs_becomes_its_lease_once_kept() {
    run_paused(async {
        let h = Harness::start(slow_run(5 * MINUTE), short_tuning(), None);
        let id = h.submit(kept_request(1)).await;
        h.wait_phase(&id, Phase::Run).await;
        let (name, now) = (sandbox_name_for(&id), h.svc.clock.now_ms());
        let renewal = h
            .svc
            .store
            .call(move |s| s.renew_lease(&name, now, 30 * MINUTE))
            .await
            .unwrap();
        assert!(matches!(renewal, LeaseRenewal::AfterJob(_)), "{renewal:?}");

        assert_eq!(h.wait_terminal(&id).await.status, JobStatus::Completed);
        tokio::time::sleep(5 * MINUTE).await;
        assert_eq!(
            h.sandbox_state(&id).await,
            SandboxState::Kept,
            "the job's own 1-minute ttl gave way to the renew"
        );
        tokio::time::sleep(30 * MINUTE).await;
        assert_eq!(h.sandbox_state(&id).await, SandboxState::Destroyed);
    });
}

/// Writes a job's log and one artifact as the guest API would, and records the artifact.
async fn job_files(h: &Harness, data: &Path, job_id: &str, created_at_ms: i64) {
    std::fs::create_dir_all(data.join("logs")).unwrap();
    std::fs::write(data.join(format!("logs/{job_id}.log")), "output\n").unwrap();
    let dir = data.join(format!("artifacts/{job_id}/out"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.txt"), "a").unwrap();
    let artifact = Artifact {
        job_id: job_id.into(),
        path: "out/a.txt".into(),
        size: 1,
        sha256: "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb".into(),
        created_at_ms,
    };
    h.svc
        .store
        .call(move |s| s.record_artifact(&artifact))
        .await
        .unwrap();
}

/// Moves a finished job's end back in time. The store stamps rows with the wall clock, which
/// paused time does not move, so age is given to the rows themselves.
fn finished_at(db: &Path, job_id: &str, at_ms: i64) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let changed = conn
        .execute(
            "UPDATE jobs SET finished_ms = ?2 WHERE id = ?1 AND finished_ms IS NOT NULL",
            rusqlite::params![job_id, at_ms],
        )
        .unwrap();
    assert_eq!(changed, 1);
}

#[test]
fn retention_removes_old_jobs_rows_and_files_and_leaves_recent_and_running_ones() {
    run_paused(async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let db = dir.path().join("agentlab.db");
        let config = Config {
            data_dir: data.clone(),
            provisioning_timeout: Duration::from_secs(3600),
            retention: Duration::from_secs(3600),
            artifact_retention: Some(30 * MINUTE),
            ..Config::default()
        };
        let mut tuning = short_tuning();
        tuning.phase_timeouts.run = Duration::from_secs(86400);
        tuning.intervals.retention_gc = MINUTE;
        let h = Harness::start_configured(
            host(256, 1024),
            config,
            slow_run(Duration::from_secs(36_000)),
            tuning,
            Some(&db),
        );
        // Three jobs end (cancelled mid-run, their VMs destroyed); one keeps running.
        let mut ended = Vec::new();
        for _ in 0..3 {
            let id = h.submit(request()).await;
            h.wait_phase(&id, Phase::Run).await;
            let cancel = CancelJob {
                job_id: id.clone(),
                status: JobStatus::Cancelled,
                reason: "by request".into(),
            };
            assert!(h.supervisor.send(cancel).await.unwrap().unwrap());
            assert_eq!(h.wait_terminal(&id).await.status, JobStatus::Cancelled);
            ended.push(id);
        }
        let running = h.submit(request()).await;
        h.wait_phase(&running, Phase::Run).await;
        let now = h.svc.clock.now_ms();
        let hour = 3_600_000;
        let (old, middle, recent) = (&ended[0], &ended[1], &ended[2]);
        // old: ended 2 h ago (past retention); middle: 45 min ago (only its artifacts are past
        // theirs); recent: just now. The running job's artifact is old too, and must stay.
        finished_at(&db, old, now - 2 * hour);
        finished_at(&db, middle, now - 45 * 60_000);
        job_files(&h, &data, old, now - 2 * hour).await;
        job_files(&h, &data, middle, now - 45 * 60_000).await;
        job_files(&h, &data, recent, now).await;
        job_files(&h, &data, &running, now - 2 * hour).await;

        RetentionCollector::new(std::sync::Arc::clone(&h.svc)).start();
        tokio::time::sleep(MINUTE + Duration::from_secs(5)).await;

        let (old_id, store) = (old.clone(), h.svc.store.clone());
        let (job, events, artifacts, sandbox) = store
            .call(move |s| {
                Ok((
                    s.get_job(&old_id)?,
                    s.events_after(&old_id, 0, 100)?,
                    s.list_artifacts(&old_id)?,
                    s.get_sandbox(&sandbox_name_for(&old_id))?,
                ))
            })
            .await
            .unwrap();
        assert!(job.is_none() && events.is_empty() && artifacts.is_empty() && sandbox.is_none());
        assert!(!data.join(format!("logs/{old}.log")).exists());
        assert!(!data.join(format!("artifacts/{old}")).exists());

        assert!(h.job(middle).await.status.is_terminal(), "the job stays");
        let id = middle.clone();
        let left = store.call(move |s| s.list_artifacts(&id)).await.unwrap();
        assert!(left.is_empty(), "its artifacts are past artifact_retention");
        assert!(!data.join(format!("artifacts/{middle}/out/a.txt")).exists());
        assert!(data.join(format!("logs/{middle}.log")).exists());

        for id in [recent, &running] {
            let job = h.job(id).await;
            assert!(!job.phases.is_empty(), "{id} keeps its history");
            let lookup = id.clone();
            let artifacts = store
                .call(move |s| s.list_artifacts(&lookup))
                .await
                .unwrap();
            assert_eq!(artifacts.len(), 1, "{id}");
            assert!(data.join(format!("artifacts/{id}/out/a.txt")).exists());
            assert!(data.join(format!("logs/{id}.log")).exists());
        }
        assert_eq!(h.job(&running).await.status, JobStatus::Running);
        let removed = |kind: &str| {
            h.svc
                .metrics
                .retention_removed
                .with_label_values(&[kind])
                .get()
        };
        assert_eq!((removed("jobs"), removed("artifacts")), (1, 1));
    });
}
