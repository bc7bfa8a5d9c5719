//! The actor runtime: a Supervisor spawns one SandboxActor per job's VM, whose lifecycle drives
//! the VM through its phases; a collector ends expired leases; a reconciler repairs the difference
//! between the store and the backend after a crash.

pub mod collector;
pub mod guest_reports;
pub mod hub;
pub mod lifecycle;
pub mod reconciler;
pub mod sandbox;
pub mod supervisor;

use std::sync::{Arc, RwLock};

use crate::backend::SharedBackend;
use crate::config::profile::Profiles;
use crate::config::tuning::TuningHandle;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::Store;

pub use hub::Hub;

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
}

impl Services {
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
