//! agentlabd's start and stop: reads (or makes) the daemon's instance id, opens the store, loads
//! profiles and tuning, builds the backend (the local backend's KVM probe starts here, in the
//! background, so the first job does not wait for it), starts the actors and servers, reloads
//! tuning, profiles and the config's reloadable keys on SIGHUP, and on SIGTERM stops admitting
//! work and suspends in-flight jobs at points they resume from.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use actix::prelude::*;
use tokio::signal::unix::{signal, SignalKind};

use crate::actors::collector::LeaseCollector;
use crate::actors::governor::ResourceGovernor;
use crate::actors::guest_reports::GuestReports;
use crate::actors::retention::RetentionCollector;
use crate::actors::supervisor::{Shutdown, Supervisor};
use crate::actors::{Clock, Hub, LiveConfig, Services};
use crate::backend::fake::{FakeBackend, SharedFake};
use crate::backend::{Backend, BackendError, BackendKind, GuestSink, SharedBackend};
use crate::config::profile::{yaml_files, Profiles};
use crate::config::tuning::{Tuning, TuningHandle};
use crate::config::{Config, ConfigError};
use crate::http::{ApiState, HttpError};
use crate::instance::{Instance, InstanceError, InstanceId};
use crate::metrics::{Metrics, MetricsError};
use crate::pve::PveBackend;
use crate::qemu::{QemuBackend, QemuDirs};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    #[error("instance id: {0}")]
    Instance(#[from] InstanceError),
    #[error("job files: {0}")]
    JobFiles(#[from] crate::jobfiles::JobFilesError),
    #[error(transparent)]
    Runner(#[from] crate::runner_binary::RunnerBinaryError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

/// What `--check-config` validated.
#[derive(Debug)]
pub struct CheckReport {
    pub profiles: Vec<String>,
    pub tuning_files: Vec<PathBuf>,
}

/// Validates the config file, every profile and every tuning file, without starting anything.
pub fn check(config_path: &Path) -> Result<CheckReport, DaemonError> {
    let config = Config::load(config_path)?;
    crate::http::load_control_token(config.control_listen, config.control_token_file.as_ref())?;
    let profiles = Profiles::load_dir(&config.profiles_dir)?;
    let tuning_files = yaml_files(&config.tuning_dir)?;
    for file in &tuning_files {
        Tuning::load(file)?.pool.check_profiles(file, &profiles)?;
    }
    if !tuning_files.contains(&config.tuning_path()) {
        return Err(ConfigError::Other {
            path: config_path.to_owned(),
            message: format!(
                "tuning `{}` is not in {}",
                config.tuning,
                config.tuning_dir.display()
            ),
        }
        .into());
    }
    Ok(CheckReport {
        profiles: profiles.names().iter().map(|n| (*n).to_owned()).collect(),
        tuning_files,
    })
}

/// The backend a daemon runs on; the fake stays reachable for benchmarks.
#[derive(Debug, Clone)]
pub enum BuiltBackend {
    Fake(Arc<FakeBackend>),
    Other(SharedBackend),
}

async fn build_backend(
    config: &Config,
    profiles: &Profiles,
    guest_addr: std::net::SocketAddr,
    sink: Arc<dyn GuestSink>,
    instance: &InstanceId,
) -> Result<BuiltBackend, DaemonError> {
    match config.backend {
        BackendKind::Fake => {
            tracing::warn!(
                "running on the fake backend: no VMs are created (tests and benchmarks only)"
            );
            Ok(BuiltBackend::Fake(Arc::new(FakeBackend::new(
                config.fake.clone(),
                sink,
            )?)))
        }
        BackendKind::Pve => {
            for warning in crate::pve::config::profile_warnings(&config.pve, profiles.all()) {
                tracing::warn!("{warning}");
            }
            // Guests on the bridge reach the daemon at guest_url; a loopback one cannot work.
            let url = config.resolved_guest_url(guest_addr);
            if url.contains("://127.") || url.contains("://localhost") || url.contains("://[::1]") {
                tracing::warn!(%url, "sandboxes cannot reach a loopback guest_url: set guest_url (and guest_listen) to the bridge address, e.g. http://10.77.0.1:8848 (docs/proxmox.md)");
            }
            let backend =
                PveBackend::with_duct(config.pve.clone(), config.proxmox_command_timeout)?;
            let node = backend.preflight().await?;
            tracing::info!(%node, snippets = %config.pve.snippets_dir.display(), bridge = %config.pve.bridge, "Proxmox VE backend ready");
            Ok(BuiltBackend::Other(Arc::new(backend)))
        }
        BackendKind::Qemu => {
            if config.guest_listen.port() == 0 {
                tracing::warn!(
                    "guest_listen asks for any port: VMs still running after a restart cannot reach \
                     the daemon again; set a fixed port"
                );
            }
            let dirs = QemuDirs::resolve(&config.qemu, &config.data_dir);
            let backend = QemuBackend::new(config.qemu.clone(), dirs, guest_addr)?
                .with_instance(instance.as_str());
            backend.preflight().await?;
            // Detached: it logs its answer, and the first start waits for it if need be.
            match backend.start_accel_probe().await {
                Some(_probe) => tracing::info!("KVM probe started"),
                None => {
                    if let Some(accel) = backend.accelerator() {
                        tracing::info!(accel, "accelerator configured");
                    }
                }
            }
            Ok(BuiltBackend::Other(Arc::new(backend)))
        }
    }
}

fn create_dirs(config: &Config) -> Result<(), DaemonError> {
    for dir in [
        config.data_dir.clone(),
        config.artifacts_dir(),
        config.logs_dir(),
    ] {
        std::fs::create_dir_all(&dir).map_err(|source| DaemonError::Io {
            context: format!("creating {}", dir.display()),
            source,
        })?;
    }
    // Uploads a daemon stopped in the middle of (an image being imported) are of no use to
    // anyone: nothing waits for them any more.
    let uploads = config.uploads_dir();
    if let Ok(entries) = std::fs::read_dir(&uploads) {
        for entry in entries.flatten() {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a stale upload");
            }
        }
    }
    Ok(())
}

fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if let Err(err) = sd_notify::notify(&[state]) {
        tracing::warn!(%err, "telling systemd our state failed");
    }
}

/// A daemon whose actors and servers run; `run` drives one until a signal.
#[derive(Debug)]
pub struct Started {
    pub svc: Arc<Services>,
    pub supervisor: Addr<Supervisor>,
    pub governor: Addr<ResourceGovernor>,
    pub backend: BuiltBackend,
    servers: crate::http::Servers,
    shutting_down: Arc<AtomicBool>,
}

impl Started {
    /// Stops admitting, suspends in-flight jobs (up to `shutdown_grace`), stops the servers.
    pub async fn shutdown(self) {
        tracing::info!("shutting down: no new work; suspending in-flight jobs");
        notify_systemd(sd_notify::NotifyState::Stopping);
        self.shutting_down.store(true, Ordering::SeqCst);
        let grace = self.svc.config.shutdown_grace;
        if tokio::time::timeout(grace, self.supervisor.send(Shutdown))
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "some jobs did not reach a resumable point in time; they resume at the next start"
            );
        }
        self.servers.stop().await;
        tracing::info!("agentlabd stopped");
    }
}

/// Starts the store, actors and servers. Must be called inside an actix system.
pub async fn start(config: Config) -> Result<Started, DaemonError> {
    let started = Instant::now();
    // Before anything binds or starts: a token file anyone may read stops start-up.
    let control_token = {
        let (listen, file) = (config.control_listen, config.control_token_file.clone());
        tokio::task::spawn_blocking(move || crate::http::load_control_token(listen, file.as_ref()))
            .await
            .map_err(|e| DaemonError::Unsupported(e.to_string()))??
    };
    create_dirs(&config)?;
    let instance_id = {
        let data_dir = config.data_dir.clone();
        tokio::task::spawn_blocking(move || InstanceId::load_or_create(&data_dir))
            .await
            .map_err(|e| DaemonError::Unsupported(e.to_string()))??
    };
    let store = {
        let path = config.db_path();
        tokio::task::spawn_blocking(move || Store::open(&path))
            .await
            .map_err(|e| DaemonError::Unsupported(e.to_string()))??
    };
    let profiles = Profiles::load_dir(&config.profiles_dir)?;
    let tuning = Tuning::load(&config.tuning_path())?;
    tuning
        .pool
        .check_profiles(&config.tuning_path(), &profiles)?;
    let tuning = TuningHandle::new(tuning);
    let hub = Arc::new(Hub::default());
    let reports: Arc<dyn GuestSink> = Arc::new(GuestReports {
        store: store.clone(),
        hub: Arc::clone(&hub),
    });
    let guest_listener = crate::http::bind_guest(config.guest_listen)?;
    let guest_addr = guest_listener
        .local_addr()
        .map_err(|source| DaemonError::Io {
            context: "reading the guest API's address".into(),
            source,
        })?;
    let built = build_backend(
        &config,
        &profiles,
        guest_addr,
        Arc::clone(&reports),
        &instance_id,
    )
    .await?;
    let backend: SharedBackend = match &built {
        BuiltBackend::Fake(fake) => Arc::new(SharedFake(Arc::clone(fake))),
        BuiltBackend::Other(backend) => Arc::clone(backend),
    };
    let guest_url = config.resolved_guest_url(guest_addr);
    let runner = {
        let configured = config.runner_path.clone();
        tokio::task::spawn_blocking(move || {
            crate::runner_binary::RunnerBinary::locate(configured.as_deref())
        })
        .await
        .map_err(|e| DaemonError::Unsupported(e.to_string()))??
    };
    match &runner {
        Some(runner) => {
            tracing::info!(path = %runner.path.display(), sha256 = %runner.sha256, bytes = runner.size, "guests get the daemon's runner")
        }
        None => tracing::warn!(
            "no runner to serve (runner_path): templates must bring their own agentlab-runner"
        ),
    }
    let config = Arc::new(config);
    let svc = Arc::new(Services {
        config: Arc::clone(&config),
        store,
        backend,
        tuning,
        profiles: RwLock::new(Arc::new(profiles)),
        hub,
        metrics: Metrics::new()?,
        guest_url,
        clock: Clock::new(),
        live: LiveConfig::new(&config),
        pool: Default::default(),
        instance: Instance::new(instance_id),
        runner,
    });
    let sampler = tokio::task::spawn_blocking(crate::governor::sampler::HostSampler::new)
        .await
        .map_err(|e| DaemonError::Unsupported(e.to_string()))?;
    let (supervisor, governor) =
        crate::actors::start_supervisor(Arc::clone(&svc), Box::new(sampler));
    LeaseCollector::new(Arc::clone(&svc)).start();
    RetentionCollector::new(Arc::clone(&svc)).start();
    let guest_files = crate::jobfiles::JobFiles::new(&config);
    // Before the guest API serves: what a crash cut short in the scratch folders goes.
    guest_files.sweep_scratch().await?;
    let shutting_down = Arc::new(AtomicBool::new(false));
    let state = actix_web::web::Data::new(ApiState {
        svc: Arc::clone(&svc),
        supervisor: supervisor.clone(),
        governor: governor.clone(),
        reports,
        log_masks: Default::default(),
        started,
        shutting_down: Arc::clone(&shutting_down),
        guest_files,
        guest_limits: crate::http::guest_limits::GuestLimits::new(config.guest_requests_per_job),
    });
    let servers = crate::http::start(&state, guest_listener, control_token)?;
    tracing::info!(
        socket = %config.socket_path.display(),
        guest = %guest_addr,
        backend = svc.backend.kind().as_str(),
        instance = %svc.instance.id,
        startup_ms = started.elapsed().as_millis() as u64,
        "agentlabd ready"
    );
    notify_systemd(sd_notify::NotifyState::Ready);
    Ok(Started {
        svc,
        supervisor,
        governor,
        backend: built,
        servers,
        shutting_down,
    })
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config, config_path: PathBuf) -> Result<(), DaemonError> {
    let daemon = start(config).await?;
    let signal_error = |source| DaemonError::Io {
        context: "installing signal handlers".into(),
        source,
    };
    let mut hangup = signal(SignalKind::hangup()).map_err(signal_error)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(signal_error)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_error)?;
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                // Reading files is blocking work: off the executor.
                let (svc, path) = (Arc::clone(&daemon.svc), config_path.clone());
                if let Err(err) = tokio::task::spawn_blocking(move || reload(&svc, &path)).await {
                    tracing::error!(%err, "reload failed");
                }
                // New pool sizes take effect now: surplus goes, deficits are refilled.
                daemon.supervisor.do_send(crate::actors::pool::Tidy);
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }

    daemon.shutdown().await;
    Ok(())
}

/// SIGHUP: puts new tuning, profiles and the config file's reloadable keys in force; an invalid
/// file keeps the old values.
fn reload(svc: &Services, config_path: &Path) {
    // Profiles first: the tuning's pool names profiles, and is checked against these.
    match Profiles::load_dir(&svc.config.profiles_dir) {
        Ok(profiles) => {
            svc.set_profiles(profiles);
            tracing::info!("profiles reloaded");
        }
        Err(err) => tracing::error!(%err, "profiles not reloaded; the old ones stay in force"),
    }
    let tuning_path = svc.config.tuning_path();
    let fresh = Tuning::load(&tuning_path).and_then(|tuning| {
        tuning
            .pool
            .check_profiles(&tuning_path, &svc.profiles())
            .map(|()| tuning)
    });
    match fresh {
        Ok(tuning) => {
            svc.tuning.put(tuning);
            tracing::info!(file = %tuning_path.display(), "tuning reloaded");
        }
        Err(err) => tracing::error!(%err, "tuning not reloaded; the old values stay in force"),
    }
    match Config::load(config_path) {
        Ok(config) => {
            svc.live.apply(&config);
            tracing::info!(
                file = %config_path.display(),
                provisioning_timeout = %humantime::format_duration(config.provisioning_timeout),
                "config reloaded (listeners, paths and the backend change only with a restart)"
            );
        }
        Err(err) => tracing::error!(%err, "config not reloaded; the old values stay in force"),
    }
}
