//! Operator tuning (`tuning/*.yaml`): per-phase timeouts, the restart policy, admission limits and
//! loop intervals. Reloaded on SIGHUP; an invalid file keeps the values in force.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{read_yaml, ConfigError};
use crate::model::Phase;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PhaseTimeouts {
    #[serde(with = "humantime_serde")]
    pub clone: Duration,
    #[serde(with = "humantime_serde")]
    pub start: Duration,
    #[serde(with = "humantime_serde")]
    pub cloud_init: Duration,
    #[serde(with = "humantime_serde")]
    pub guest_agent: Duration,
    #[serde(with = "humantime_serde")]
    pub run: Duration,
    #[serde(with = "humantime_serde")]
    pub upload: Duration,
    #[serde(with = "humantime_serde")]
    pub destroy: Duration,
}

impl Default for PhaseTimeouts {
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(m * 60);
        PhaseTimeouts {
            clone: min(2),
            start: min(2),
            cloud_init: min(5),
            guest_agent: min(2),
            run: min(60),
            upload: min(10),
            destroy: min(2),
        }
    }
}

impl PhaseTimeouts {
    pub fn get(&self, phase: Phase) -> Duration {
        match phase {
            Phase::Clone => self.clone,
            Phase::Start => self.start,
            Phase::CloudInit => self.cloud_init,
            Phase::GuestAgent => self.guest_agent,
            Phase::Run => self.run,
            Phase::Upload => self.upload,
            Phase::Destroy => self.destroy,
        }
    }
}

/// At most `max_restarts` restarts of one job's actor within `window`, each after an exponential
/// backoff from `backoff_initial` up to `backoff_max`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartPolicy {
    pub max_restarts: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 3,
            window: Duration::from_secs(600),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
        }
    }
}

impl RestartPolicy {
    /// The delay before restart number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.backoff_initial
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admission {
    /// Sandboxes alive at once, whatever the host readings say.
    pub max_concurrent: u32,
    /// Queued jobs beyond this are refused with 429.
    pub queue_max: u32,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            max_concurrent: 4,
            queue_max: 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Intervals {
    /// How often waiting phases poll the guest (exec status, VM state).
    #[serde(with = "humantime_serde")]
    pub guest_poll: Duration,
    #[serde(with = "humantime_serde")]
    pub lease_gc: Duration,
    #[serde(with = "humantime_serde")]
    pub reconcile: Duration,
}

impl Default for Intervals {
    fn default() -> Self {
        Intervals {
            guest_poll: Duration::from_secs(1),
            lease_gc: Duration::from_secs(30),
            reconcile: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tuning {
    pub phase_timeouts: PhaseTimeouts,
    pub restart: RestartPolicy,
    pub admission: Admission,
    pub intervals: Intervals,
}

impl Tuning {
    pub fn load(path: &Path) -> Result<Tuning, ConfigError> {
        let tuning: Tuning = read_yaml(path)?;
        tuning.validate(path)?;
        Ok(tuning)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        for phase in Phase::ALL {
            if self.phase_timeouts.get(*phase).is_zero() {
                return Err(ConfigError::invalid(
                    path,
                    &format!("phase_timeouts.{phase}"),
                    "must be above 0",
                ));
            }
        }
        if self.restart.backoff_max < self.restart.backoff_initial {
            return Err(ConfigError::invalid(
                path,
                "restart.backoff_max",
                "must be at least backoff_initial",
            ));
        }
        if self.admission.max_concurrent == 0 {
            return Err(ConfigError::invalid(
                path,
                "admission.max_concurrent",
                "must be above 0",
            ));
        }
        for (key, value) in [
            ("intervals.guest_poll", self.intervals.guest_poll),
            ("intervals.lease_gc", self.intervals.lease_gc),
            ("intervals.reconcile", self.intervals.reconcile),
        ] {
            if value < Duration::from_millis(10) {
                return Err(ConfigError::invalid(path, key, "must be at least 10ms"));
            }
        }
        Ok(())
    }
}

/// The tuning in force, shared by every actor and swapped whole on reload.
#[derive(Debug, Clone)]
pub struct TuningHandle(Arc<RwLock<Arc<Tuning>>>);

impl TuningHandle {
    pub fn new(tuning: Tuning) -> Self {
        TuningHandle(Arc::new(RwLock::new(Arc::new(tuning))))
    }

    pub fn get(&self) -> Arc<Tuning> {
        match self.0.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Loads `path` and puts it in force; on error the old values stay and the error is returned.
    pub fn reload(&self, path: &Path) -> Result<Arc<Tuning>, ConfigError> {
        let fresh = Arc::new(Tuning::load(path)?);
        match self.0.write() {
            Ok(mut guard) => *guard = Arc::clone(&fresh),
            Err(poisoned) => *poisoned.into_inner() = Arc::clone(&fresh),
        }
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tuning");

    #[test]
    fn every_shipped_tuning_file_is_valid() {
        let files = super::super::profile::yaml_files(Path::new(SHIPPED)).unwrap();
        assert!(!files.is_empty());
        for file in files {
            Tuning::load(&file).unwrap();
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = RestartPolicy::default();
        assert_eq!(policy.backoff(1), Duration::from_secs(1));
        assert_eq!(policy.backoff(3), Duration::from_secs(4));
        assert_eq!(policy.backoff(30), Duration::from_secs(30));
    }

    #[test]
    fn an_invalid_reload_keeps_the_old_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.yaml");
        std::fs::write(&path, "phase_timeouts: {run: 5m}\n").unwrap();
        let handle = TuningHandle::new(Tuning::default());
        handle.reload(&path).unwrap();
        assert_eq!(handle.get().phase_timeouts.run, Duration::from_secs(300));
        std::fs::write(&path, "phase_timeouts: {run: 0s}\n").unwrap();
        let err = handle.reload(&path).unwrap_err().to_string();
        assert!(err.contains("phase_timeouts.run"), "{err}");
        assert_eq!(handle.get().phase_timeouts.run, Duration::from_secs(300));
        std::fs::write(&path, "phase_timeouts: {typo: 5m}\n").unwrap();
        assert!(handle.reload(&path).is_err());
        assert_eq!(handle.get().phase_timeouts.run, Duration::from_secs(300));
    }
}
