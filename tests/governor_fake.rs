//! The ResourceGovernor in the actor runtime, on the fake backend in paused time with injected host
//! readings: jobs wait in the queue rather than overcommit the host and all complete; the head is
//! never overtaken; pressure holds the queue and its clearing releases it; boot outcomes reach the
//! boot cap; deadlines end queued jobs promptly, or early when predictable; a job no idle host
//! could take fails at once, thin disks count what they take, and a queued job says why it waits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use agentlab::actors::governor::{GetHeadWait, GetStatus};
use agentlab::backend::fake::{FakeConfig, FakeDisk, FakeOp, Fault, Latency};
use agentlab::governor::readings::{DiskReadings, Pressure, Stall};
use agentlab::governor::status::GovernorStatus;
use agentlab::model::{JobRequest, JobStatus, Phase};
use common::{host, request, run_paused, short_tuning, Harness};

fn latency(ops: &[(FakeOp, u64)]) -> FakeConfig {
    FakeConfig {
        latency: ops
            .iter()
            .map(|(op, ms)| {
                (
                    *op,
                    Latency {
                        min_ms: *ms,
                        max_ms: *ms,
                    },
                )
            })
            .collect(),
        ..FakeConfig::default()
    }
}

fn profile(name: &str) -> JobRequest {
    JobRequest {
        profile: name.into(),
        ..request()
    }
}

async fn status(h: &Harness) -> GovernorStatus {
    h.governor
        .send(GetStatus { committed: None })
        .await
        .unwrap()
}

/// Polls (in virtual time) until every job is terminal; returns the most VMs alive at once and
/// the most sandboxes booting at once.
async fn run_all(h: &Harness, ids: &[String]) -> (usize, u32) {
    let (mut vms, mut booting) = (0, 0);
    for _ in 0..200_000 {
        vms = vms.max(h.fake.vm_names().len());
        let holdings = h.svc.store.call(|s| s.holdings()).await.unwrap();
        booting = booting.max(holdings.iter().filter(|x| x.booting).count() as u32);
        let mut done = true;
        for id in ids {
            done &= h.job(id).await.status.is_terminal();
        }
        if done {
            return (vms, booting);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("jobs never ended");
}

#[test]
fn on_a_small_host_jobs_wait_in_the_queue_and_all_complete() {
    run_paused(async {
        // 2 cores: 4 vCPUs, so one 4-vCPU balanced sandbox at a time, whatever max_concurrent says.
        let fake = latency(&[(FakeOp::Boot, 5_000), (FakeOp::Run, 30_000)]);
        let h = Harness::start_on(host(2, 64), fake, short_tuning(), None);
        let mut ids = Vec::new();
        for _ in 0..6 {
            ids.push(h.submit(request()).await);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let s = status(&h).await;
        assert_eq!(s.queue.length, 5, "{s:?}");
        assert_eq!(s.queue.head.as_deref(), Some(ids[1].as_str()));
        let waiting = s.queue.waiting.unwrap();
        assert_eq!(waiting.reason, "cpu", "{waiting:?}");
        assert!(waiting.detail.contains("vCPU budget"), "{waiting:?}");
        assert_eq!(h.job(&ids[5]).await.queue_position, Some(5));

        let (vms, _) = run_all(&h, &ids).await;
        assert_eq!(vms, 1, "never more than the budget allows");
        for id in &ids {
            let job = h.job(id).await;
            assert_eq!(job.status, JobStatus::Completed, "{job:?}");
        }
        // FIFO: they started in the order they were submitted.
        let mut started = Vec::new();
        for id in &ids {
            started.push(h.job(id).await.phases[0].started_at_ms);
        }
        assert!(started.windows(2).all(|w| w[0] <= w[1]), "{started:?}");
        assert_eq!(h.svc.metrics.governor.admitted.get(), 6);
        let s = status(&h).await;
        assert_eq!((s.queue.length, s.queue.waiting), (0, None));
    });
}

#[test]
fn the_head_of_the_queue_is_never_overtaken() {
    run_paused(async {
        // 4 cores: 8 vCPUs. A balanced job (4) runs; the head asks 8 and must wait; the 2-vCPU job
        // behind it would fit but waits its turn.
        let fake = latency(&[(FakeOp::Run, 60_000)]);
        let h = Harness::start_on(host(4, 128), fake, short_tuning(), None);
        let running = h.submit(request()).await;
        h.wait_phase(&running, Phase::Run).await;
        let big = h.submit(profile("high-performance")).await;
        let small = h.submit(profile("high-throughput")).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(h.job(&big).await.status, JobStatus::Queued);
        assert_eq!(
            h.job(&small).await.status,
            JobStatus::Queued,
            "overtook the head"
        );
        let s = status(&h).await;
        assert_eq!(s.queue.head.as_deref(), Some(big.as_str()));
        assert_eq!(s.queue.waiting.unwrap().reason, "cpu");

        let ids = [running, big.clone(), small.clone()];
        run_all(&h, &ids).await;
        for id in &ids {
            assert_eq!(h.job(id).await.status, JobStatus::Completed);
        }
        let (b, s) = (h.job(&big).await, h.job(&small).await);
        assert!(b.phases[0].started_at_ms <= s.phases[0].started_at_ms);
    });
}

fn cpu_pressure(some: f64) -> Option<Pressure> {
    Some(Pressure {
        cpu: Stall {
            some_avg10: some,
            full_avg10: Some(0.0),
        },
        ..Pressure::default()
    })
}

#[test]
fn pressure_holds_the_queue_beyond_the_floor_and_its_clearing_releases_it() {
    run_paused(async {
        let fake = latency(&[(FakeOp::Run, 600_000)]);
        let mut busy = host(64, 512);
        busy.pressure = cpu_pressure(90.0);
        let h = Harness::start_on(busy, fake, short_tuning(), None);
        // Below the progress floor (no sandbox alive) pressure does not hold the first job.
        let first = h.submit(request()).await;
        h.wait_phase(&first, Phase::Run).await;
        let second = h.submit(request()).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(h.job(&second).await.status, JobStatus::Queued);
        let waiting = status(&h).await.queue.waiting.unwrap();
        assert_eq!(waiting.reason, "cpu");
        assert!(
            waiting.detail.contains("PSI cpu some avg10 90.0%"),
            "{waiting:?}"
        );
        // Inside the hysteresis band (trips at 60, clears at 30) it stays held.
        h.host.update(|r| r.pressure = cpu_pressure(45.0));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(h.job(&second).await.status, JobStatus::Queued);
        // Cleared: the next sample admits it.
        h.host.update(|r| r.pressure = cpu_pressure(20.0));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(h.job(&second).await.status, JobStatus::Running);
        assert!(status(&h).await.queue.waiting.is_none());
        let throttled = h
            .svc
            .metrics
            .governor
            .throttled
            .with_label_values(&["cpu"])
            .get();
        assert_eq!(throttled, 0);
    });
}

#[test]
fn boots_teach_the_boot_cap() {
    run_paused(async {
        let mut tuning = short_tuning();
        tuning.governor.boot_cap.initial = 2.0;
        tuning.governor.boot_cap.max = 4;
        // Boots of 5 s, on time: with six jobs the cap is reached and grows, one step per cap's
        // worth of boots, but never past max.
        let fake = latency(&[(FakeOp::Boot, 5_000), (FakeOp::Run, 1_000)]);
        let h = Harness::start_on(host(64, 512), fake, tuning.clone(), None);
        let mut ids = Vec::new();
        for _ in 0..8 {
            ids.push(h.submit(request()).await);
        }
        let (_, booting) = run_all(&h, &ids).await;
        assert!((2..=4).contains(&booting), "booting at once: {booting}");
        for id in &ids {
            assert_eq!(h.job(id).await.status, JobStatus::Completed);
        }
        let cap = status(&h).await.boot_cap;
        assert_eq!(cap.on_time, 8, "{cap:?}");
        assert!(cap.cap > 2.0, "{cap:?}");
        assert!(cap.baseline_seconds.unwrap() >= 5.0, "{cap:?}");

        // A boot that times out halves the cap.
        let fake = FakeConfig {
            faults: BTreeMap::from([(
                FakeOp::Boot,
                Fault {
                    hang: true,
                    ..Fault::default()
                },
            )]),
            ..FakeConfig::default()
        };
        tuning.governor.boot_cap.initial = 4.0;
        let h = Harness::start_on(host(64, 512), fake, tuning, None);
        let id = h.submit(request()).await;
        let job = h.wait_terminal(&id).await;
        assert_eq!(job.status, JobStatus::Timeout);
        let cap = status(&h).await.boot_cap;
        assert_eq!((cap.timeouts, cap.limit), (1, 2), "{cap:?}");
        assert_eq!(cap.last.unwrap().verdict, "timeout");
    });
}

#[test]
fn governor_off_admits_up_to_max_concurrent_whatever_the_host() {
    run_paused(async {
        let mut tuning = short_tuning();
        tuning.governor.enabled = false;
        tuning.admission.max_concurrent = 3;
        let fake = latency(&[(FakeOp::Run, 30_000)]);
        let h = Harness::start_on(host(1, 4), fake, tuning, None);
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(h.submit(request()).await);
        }
        let (vms, _) = run_all(&h, &ids).await;
        assert_eq!(vms, 3);
        let s = status(&h).await;
        assert!(!s.enabled);
        assert!(s.readings.is_some(), "readings are still taken");
    });
}

#[test]
fn a_job_that_can_never_fit_fails_at_once_and_the_queue_moves_on() {
    run_paused(async {
        // 2 cores allow 4 vCPUs; high-performance asks 8.
        let h = Harness::start_on(host(2, 64), FakeConfig::default(), short_tuning(), None);
        let big = h.submit(profile("high-performance")).await;
        let next = h.submit(request()).await;
        let job = h.wait_terminal(&big).await;
        assert_eq!(job.status, JobStatus::Failed);
        let error = job.error.unwrap();
        assert!(
            error.contains("does not fit this host") && error.contains("needs 8 vCPUs"),
            "{error}"
        );
        assert_eq!(h.wait_terminal(&next).await.status, JobStatus::Completed);
    });
}

#[test]
fn a_deadline_that_passes_in_the_queue_ends_the_job_promptly() {
    run_paused(async {
        let fake = latency(&[(FakeOp::Run, 600_000)]);
        let h = Harness::start_on(host(2, 64), fake, short_tuning(), None);
        let running = h.submit(request()).await;
        h.wait_phase(&running, Phase::Run).await;
        let waiting = h
            .submit(JobRequest {
                deadline_seconds: Some(30),
                ..request()
            })
            .await;
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(h.job(&waiting).await.status, JobStatus::Queued);
        tokio::time::sleep(Duration::from_secs(7)).await;
        let job = h.job(&waiting).await;
        assert_eq!(job.status, JobStatus::Timeout, "{job:?}");
        assert!(
            job.error.unwrap().contains("deadline passed while queued"),
            "the reason says so"
        );
        assert_eq!(h.job(&running).await.status, JobStatus::Running);
    });
}

#[test]
fn a_deadline_that_predictably_passes_fails_the_job_early() {
    run_paused(async {
        // One job at a time, each about a minute: once a few have gone through, the governor
        // knows about one starts per minute.
        let fake = latency(&[(FakeOp::Run, 60_000)]);
        let h = Harness::start_on(host(2, 64), fake, short_tuning(), None);
        let mut ids = Vec::new();
        for _ in 0..8 {
            ids.push(h.submit(request()).await);
        }
        h.wait_phase(&ids[4], Phase::Run).await;
        let rate = status(&h).await.queue.admissions_per_minute.unwrap();
        assert!((0.8..1.2).contains(&rate), "{rate}");
        // Three ahead of it plus itself at a minute each: about 4 minutes of wait for 2 minutes
        // of deadline. It fails now, not in two minutes.
        let doomed = h
            .submit(JobRequest {
                deadline_seconds: Some(120),
                ..request()
            })
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let job = h.job(&doomed).await;
        assert_eq!(job.status, JobStatus::Timeout, "{job:?}");
        let error = job.error.unwrap();
        assert!(
            error.contains("deadline would pass while queued"),
            "{error}"
        );
        // One that can make it is left alone.
        let fine = h
            .submit(JobRequest {
                deadline_seconds: Some(3_600),
                ..request()
            })
            .await;
        ids.push(fine.clone());
        run_all(&h, &ids).await;
        assert_eq!(h.job(&fine).await.status, JobStatus::Completed);
        for id in &ids {
            assert_eq!(h.job(id).await.status, JobStatus::Completed);
        }
    });
}

const GIB: u64 = 1 << 30;

/// The host of the issue: 74 GB free of 252 GB of storage.
fn demo_disk(available_gb: u64) -> Option<DiskReadings> {
    Some(DiskReadings {
        path: "/var/lib/agentlab".into(),
        total_bytes: 252 * GIB,
        available_bytes: available_gb * GIB,
    })
}

fn thin(allocated_bytes: u64) -> Option<FakeDisk> {
    Some(FakeDisk {
        thin: true,
        allocated_bytes,
    })
}

#[test]
fn a_job_a_static_rule_blocks_on_an_idle_host_fails_at_once_with_the_rule_and_numbers() {
    run_paused(async {
        // Thick disks: the balanced profile's 30 GB would leave 43.5 GB, under the 50.4 to keep.
        let mut readings = host(64, 256);
        readings.disk = demo_disk(74);
        let h = Harness::start_on(readings, FakeConfig::default(), short_tuning(), None);
        let id = h.submit(request()).await;
        let job = h.wait_terminal(&id).await;
        assert_eq!(job.status, JobStatus::Failed, "{job:?}");
        assert!(job.phases.is_empty(), "never started: {job:?}");
        let error = job.error.unwrap();
        for part in [
            "does not fit this host: disk",
            "74.0 GB free",
            "30.5 GB for this one",
            "50.4 GB",
        ] {
            assert!(error.contains(part), "{part}: {error}");
        }

        // Thin disks, as the local backend reports them, take what they have written: the same
        // host runs the job.
        h.fake.set_disk(thin(200 << 20));
        let id = h.submit(request()).await;
        let job = h.wait_terminal(&id).await;
        assert_eq!(job.status, JobStatus::Completed, "{job:?}");

        // Memory: a profile larger than the host may ever give fails at once too.
        h.host.update(|r| r.memory.total_bytes = 8 * GIB);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let id = h.submit(request()).await;
        let job = h.wait_terminal(&id).await;
        assert_eq!(job.status, JobStatus::Failed);
        assert!(
            job.error
                .as_deref()
                .unwrap()
                .contains("does not fit this host: memory"),
            "{job:?}"
        );
    });
}

async fn waits_for(h: &Harness, id: &str) -> agentlab::governor::status::JobQueue {
    let position = h.job(id).await.queue_position.unwrap();
    h.governor
        .send(GetHeadWait)
        .await
        .unwrap()
        .for_job(id, position)
}

#[test]
fn a_queued_job_shows_why_it_waits_and_the_reason_follows_the_host() {
    run_paused(async {
        // 2 cores: one balanced sandbox at a time. Thin disks of 1 GB each.
        let fake = FakeConfig {
            disk: thin(GIB),
            ..latency(&[(FakeOp::Run, 600_000)])
        };
        let mut readings = host(2, 64);
        readings.disk = demo_disk(74);
        let h = Harness::start_on(readings, fake, short_tuning(), None);
        let running = h.submit(request()).await;
        h.wait_phase(&running, Phase::Run).await;
        let head = h.submit(request()).await;
        let behind = h.submit(request()).await;
        tokio::time::sleep(Duration::from_secs(3)).await;

        let q = waits_for(&h, &head).await;
        assert_eq!((q.position, q.reason.as_str()), (1, "cpu"), "{q:?}");
        assert!(q.waiting_for.contains("vCPU budget"), "{q:?}");
        let q = waits_for(&h, &behind).await;
        assert_eq!(q.reason, "queue");
        assert_eq!(q.waiting_for, "1 job ahead; the first waits for cpu");

        // More cores, but the storage fills up: the head now waits for disk, with the numbers.
        // (1 GB written of its 4 GB reserve: the running sandbox keeps 3 GB more.)
        h.host.update(|r| {
            r.cpu.physical_cores = 16;
            r.disk = demo_disk(57);
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(h.job(&head).await.status, JobStatus::Queued);
        let q = waits_for(&h, &head).await;
        assert_eq!(q.reason, "disk", "{q:?}");
        assert!(
            q.waiting_for
                .contains("57.0 GB free − 3.0 GB growth reserve left to 1 live sandboxes"),
            "{q:?}"
        );
        assert_eq!(
            waits_for(&h, &behind).await.waiting_for,
            "1 job ahead; the first waits for disk"
        );

        // Space again: both start.
        h.host.update(|r| r.disk = demo_disk(200));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(h.job(&head).await.status, JobStatus::Running);
        h.wait_phase(&behind, Phase::Run).await;
    });
}
