//! Shared set-up for tests that run the actor runtime on the fake backend.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use agentlab::actors::collector::LeaseCollector;
use agentlab::actors::governor::ResourceGovernor;
use agentlab::actors::guest_reports::GuestReports;
use agentlab::actors::supervisor::{Admit, Supervisor};
use agentlab::actors::{Clock, Hub, LiveConfig, Services};
use agentlab::backend::fake::{FakeBackend, FakeConfig, SharedFake};
use agentlab::config::profile::Profiles;
use agentlab::config::tuning::{Tuning, TuningHandle};
use agentlab::config::Config;
use agentlab::governor::readings::{
    CpuReadings, DiskReadings, HostReadings, MemoryReadings, Pressure,
};
use agentlab::governor::sampler::ManualSampler;
use agentlab::metrics::Metrics;
use agentlab::model::{new_id, Job, JobRequest};
use agentlab::store::{NewJob, Store};

pub const PROFILES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles");

/// The instance id of every harness, so that a restarted harness owns what the first one made.
pub const TEST_INSTANCE: &str = "0000-test-instance";

pub fn test_instance() -> agentlab::instance::Instance {
    agentlab::instance::Instance::new(agentlab::instance::InstanceId::parse(TEST_INSTANCE).unwrap())
}

/// Runs a test body in an actix system whose clock is paused: timers fire as soon as nothing else
/// can run, so minute-long timeouts take no real time.
pub fn run_paused<F: Future>(body: F) -> F::Output {
    let system = actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    });
    system.block_on(body)
}

pub struct Harness {
    pub svc: Arc<Services>,
    pub fake: Arc<FakeBackend>,
    pub supervisor: Addr<Supervisor>,
    pub governor: Addr<ResourceGovernor>,
    /// The host readings the governor sees; change them to change the host.
    pub host: ManualSampler,
}

const GIB: u64 = 1024 * 1024 * 1024;

/// A host with `cores` physical cores, `memory_gb` of RAM (nearly all available), 1 TB of storage
/// (80% free) and no pressure at all.
pub fn host(cores: u32, memory_gb: u64) -> HostReadings {
    HostReadings {
        cpu: CpuReadings {
            physical_cores: cores,
            logical_cpus: cores,
            per_core_percent: vec![5.0; cores as usize],
            usage_percent: 5.0,
            ..CpuReadings::default()
        },
        memory: MemoryReadings {
            total_bytes: memory_gb * GIB,
            available_bytes: memory_gb * GIB - GIB,
            swap_total_bytes: 0,
            swap_used_bytes: 0,
        },
        iowait_percent: Some(0.0),
        pressure: Some(Pressure::default()),
        disk: Some(DiskReadings {
            path: "/var/lib/agentlab".into(),
            total_bytes: 1024 * GIB,
            available_bytes: 800 * GIB,
        }),
        notes: Vec::new(),
    }
}

pub fn short_tuning() -> Tuning {
    let mut tuning = Tuning::default();
    let t = &mut tuning.phase_timeouts;
    t.clone = Duration::from_secs(60);
    t.start = Duration::from_secs(60);
    t.cloud_init = Duration::from_secs(120);
    t.guest_agent = Duration::from_secs(60);
    t.run = Duration::from_secs(600);
    t.upload = Duration::from_secs(120);
    t.destroy = Duration::from_secs(60);
    tuning.restart.backoff_initial = Duration::from_millis(100);
    tuning.restart.backoff_max = Duration::from_secs(1);
    tuning.admission.max_concurrent = 8;
    tuning
}

impl Harness {
    /// On a host big enough that the governor never holds anything back.
    pub fn start(fake: FakeConfig, tuning: Tuning, db: Option<&Path>) -> Harness {
        Harness::start_on(host(256, 1024), fake, tuning, db)
    }

    pub fn start_on(
        readings: HostReadings,
        fake: FakeConfig,
        tuning: Tuning,
        db: Option<&Path>,
    ) -> Harness {
        let config = Config {
            provisioning_timeout: Duration::from_secs(3600),
            ..Config::default()
        };
        Harness::start_configured(readings, config, fake, tuning, db)
    }

    /// With the daemon config given (its data dir, retention, …).
    pub fn start_configured(
        readings: HostReadings,
        config: Config,
        fake: FakeConfig,
        tuning: Tuning,
        db: Option<&Path>,
    ) -> Harness {
        let store = match db {
            Some(path) => Store::open(path).unwrap(),
            None => Store::open_in_memory().unwrap(),
        };
        let hub = Arc::new(Hub::default());
        let sink = Arc::new(GuestReports {
            store: store.clone(),
            hub: Arc::clone(&hub),
        });
        let fake = Arc::new(FakeBackend::new(fake, sink).unwrap());
        let live = LiveConfig::new(&config);
        let svc = Arc::new(Services {
            config: Arc::new(config),
            store,
            backend: Arc::new(SharedFake(Arc::clone(&fake))),
            tuning: TuningHandle::new(tuning),
            profiles: RwLock::new(Arc::new(Profiles::load_dir(Path::new(PROFILES)).unwrap())),
            hub,
            metrics: Metrics::new().unwrap(),
            guest_url: "http://10.0.2.100".into(),
            clock: Clock::new(),
            live,
            pool: Default::default(),
            runner: None,
            instance: test_instance(),
        });
        let host = ManualSampler::new(readings);
        let (supervisor, governor) =
            agentlab::actors::start_supervisor(Arc::clone(&svc), Box::new(host.clone()));
        LeaseCollector::new(Arc::clone(&svc)).start();
        Harness {
            svc,
            fake,
            supervisor,
            governor,
            host,
        }
    }

    pub async fn submit(&self, request: JobRequest) -> String {
        let deadline_ms = request.deadline_seconds.map(|s| {
            self.svc
                .clock
                .now_ms()
                .saturating_add(i64::try_from(s * 1000).unwrap())
        });
        let id = new_id();
        let new = NewJob {
            id: id.clone(),
            request,
            deadline_ms,
        };
        self.svc
            .store
            .call(move |s| s.insert_job(&new, 1000))
            .await
            .unwrap();
        self.supervisor.do_send(Admit);
        id
    }

    pub async fn job(&self, id: &str) -> Job {
        let id = id.to_owned();
        self.svc
            .store
            .call(move |s| s.get_job(&id))
            .await
            .unwrap()
            .unwrap()
    }

    /// Waits (in virtual time, woken by the job's events) until the job is terminal.
    pub async fn wait_terminal(&self, id: &str) -> Job {
        let mut events = self.svc.hub.subscribe();
        for _ in 0..10_000 {
            let job = self.job(id).await;
            if job.status.is_terminal() {
                return job;
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
        }
        panic!("job {id} never ended: {:?}", self.job(id).await);
    }

    /// The state of the job's sandbox, which must exist.
    pub async fn sandbox_state(&self, job_id: &str) -> agentlab::model::SandboxState {
        let name = agentlab::model::sandbox_name_for(job_id);
        self.svc
            .store
            .call(move |s| s.get_sandbox(&name))
            .await
            .unwrap()
            .unwrap()
            .state
    }

    /// Polls until the job has begun `phase`.
    pub async fn wait_phase(&self, id: &str, phase: agentlab::model::Phase) -> Job {
        for _ in 0..100_000 {
            let job = self.job(id).await;
            if job.phase == Some(phase) || job.status.is_terminal() {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("job {id} never reached {phase}");
    }
}

/// A fake backend whose simulated command runs `run`.
pub fn slow_run(run: Duration) -> FakeConfig {
    let ms = u64::try_from(run.as_millis()).unwrap();
    FakeConfig {
        latency: std::collections::BTreeMap::from([(
            agentlab::backend::fake::FakeOp::Run,
            agentlab::backend::fake::Latency {
                min_ms: ms,
                max_ms: ms,
            },
        )]),
        ..FakeConfig::default()
    }
}

pub fn request() -> JobRequest {
    JobRequest {
        profile: "balanced".into(),
        task: "do the thing".into(),
        ..JobRequest::default()
    }
}

pub mod daemon;
pub mod guest;
pub mod mock;
pub mod vm;

pub fn temp_path(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Runs git in `dir` with a fixed committer; its trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}
