//! The actor runtime: a Supervisor spawns one SandboxActor per job's VM, whose lifecycle drives
//! the VM through its phases; the ResourceGovernor decides when a queued job may start; a collector
//! ends expired leases, another removes what is past retention; a reconciler repairs the difference between the store and the backend
//! after a crash.

pub mod changes;
pub mod cloud_check;
pub mod collector;
pub mod governor;
pub mod guest_reports;
pub mod hub;
pub mod lifecycle;
pub mod pool;
pub mod pool_book;
pub mod pool_boot;
pub mod pool_plan;
pub mod pool_status;
pub mod reconciler;
pub mod restore;
pub mod retention;
pub mod runner_fetch;
pub mod sandbox;
pub mod supervisor;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::backend::SharedBackend;
use crate::config::profile::Profiles;
use crate::config::tuning::TuningHandle;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::Store;

pub use hub::Hub;

use actix::{Actor, Addr, AsyncContext, Context};

use crate::governor::sampler::Sampler;
use governor::ResourceGovernor;
use supervisor::Supervisor;

/// Starts the Supervisor and the ResourceGovernor it asks, each knowing the other. Call inside an
/// actix system.
pub fn start_supervisor(
    svc: Arc<Services>,
    sampler: Box<dyn Sampler>,
) -> (Addr<Supervisor>, Addr<ResourceGovernor>) {
    let context = Context::<Supervisor>::new();
    let governor =
        ResourceGovernor::new(Arc::clone(&svc), sampler, context.address().recipient()).start();
    let pool = pool::PoolKeeper::new(Arc::clone(&svc), context.address().recipient()).start();
    let supervisor = context.run(
        Supervisor::new(svc)
            .with_governor(governor.clone())
            .with_pool(pool),
    );
    (supervisor, governor)
}

/// What every actor and request handler shares.
#[derive(Debug)]
pub struct Services {
    pub config: Arc<Config>,
    pub store: Store,
    pub backend: SharedBackend,
    pub tuning: TuningHandle,
    pub profiles: RwLock<Arc<Profiles>>,
    pub hub: Arc<Hub>,
    pub metrics: Metrics,
    /// How guests reach the daemon's guest API (e.g. `http://10.0.2.100` behind a guestfwd).
    pub guest_url: String,
    pub clock: Clock,
    /// This daemon's instance id, which its VMs carry, and the foreign VMs last seen.
    pub instance: crate::instance::Instance,
    /// The config file's values that SIGHUP puts in force without a restart.
    pub live: LiveConfig,
    /// The warm pool's hits, misses and failed boots, per profile.
    pub pool: pool_book::PoolBook,
    /// The runner the daemon serves to its guests; None: templates bring their own.
    pub runner: Option<crate::runner_binary::RunnerBinary>,
}

/// The config file's keys that a reload changes in a running daemon (the others need a restart:
/// listeners, paths, the backend). Read on every use, so a reload applies to the next phase.
#[derive(Debug)]
pub struct LiveConfig {
    provisioning_timeout_ms: AtomicU64,
}

impl LiveConfig {
    pub fn new(config: &Config) -> LiveConfig {
        let live = LiveConfig {
            provisioning_timeout_ms: AtomicU64::new(0),
        };
        live.apply(config);
        live
    }

    /// Puts a freshly loaded config's reloadable values in force.
    pub fn apply(&self, config: &Config) {
        let ms = u64::try_from(config.provisioning_timeout.as_millis()).unwrap_or(u64::MAX);
        self.provisioning_timeout_ms.store(ms, Ordering::Relaxed);
    }

    pub fn provisioning_timeout(&self) -> Duration {
        Duration::from_millis(self.provisioning_timeout_ms.load(Ordering::Relaxed))
    }
}

/// Wall-clock milliseconds for leases and deadlines, advanced by tokio's monotonic clock from an
/// anchor: immune to wall-clock jumps, and moved by tests that pause and advance time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall_ms: i64,
    at: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            wall_ms: crate::model::now_ms(),
            at: tokio::time::Instant::now(),
        }
    }

    pub fn now_ms(&self) -> i64 {
        let elapsed = tokio::time::Instant::now().saturating_duration_since(self.at);
        self.wall_ms
            .saturating_add(i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Services {
    /// The overall limit on clone → guest agent, as last (re)loaded.
    pub fn provisioning_timeout(&self) -> Duration {
        self.live.provisioning_timeout()
    }

    pub fn profiles(&self) -> Arc<Profiles> {
        match self.profiles.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub fn set_profiles(&self, profiles: Profiles) {
        let fresh = Arc::new(profiles);
        match self.profiles.write() {
            Ok(mut guard) => *guard = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
    }
}
