//! Operator tuning (`tuning/*.yaml`): per-phase timeouts, the restart policy, admission limits,
//! loop intervals, the ResourceGovernor (`governor:`, see [`super::governor`]) and the switch for
//! snapshot starts (`snapshots:`) and the warm pool (`pool:`, see [`super::pool`]). Reloaded on
//! SIGHUP; an invalid file keeps the values in force.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::governor::GovernorSection;
use super::pool::PoolTuning;
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
    /// Fail a queued job as soon as its deadline predictably passes before it would start (from
    /// the recent admission rate), not only once it has passed.
    pub predict_deadlines: bool,
    /// A job fails early only when its predicted wait is at least this many times the time it
    /// has left.
    pub deadline_margin: f64,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            max_concurrent: 4,
            queue_max: 1000,
            predict_deadlines: true,
            deadline_margin: 1.5,
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
    /// How often the retention collector removes jobs and artifacts past `retention`.
    #[serde(with = "humantime_serde")]
    pub retention_gc: Duration,
}

impl Default for Intervals {
    fn default() -> Self {
        Intervals {
            guest_poll: Duration::from_secs(1),
            lease_gc: Duration::from_secs(30),
            reconcile: Duration::from_secs(60),
            retention_gc: Duration::from_secs(3600),
        }
    }
}

/// Snapshot starts: a backend that can (the local qemu one) restores a sandbox from a snapshot
/// of a booted template instead of booting it. Off, every sandbox boots cold: `start: auto`
/// jobs boot, `start: snapshot` jobs are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Snapshots {
    pub enabled: bool,
}

impl Default for Snapshots {
    fn default() -> Self {
        Snapshots { enabled: true }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tuning {
    pub phase_timeouts: PhaseTimeouts,
    pub restart: RestartPolicy,
    pub admission: Admission,
    pub intervals: Intervals,
    pub governor: GovernorSection,
    pub snapshots: Snapshots,
    /// The warm pool: READY sandboxes kept per profile.
    pub pool: PoolTuning,
}

impl Tuning {
    /// Whether sandboxes may start from a snapshot (`snapshots.enabled`); see
    /// [`crate::start::resolve_start`].
    pub fn snapshots_enabled(&self) -> bool {
        self.snapshots.enabled
    }

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
        if !(self.admission.deadline_margin.is_finite() && self.admission.deadline_margin >= 1.0) {
            return Err(ConfigError::invalid(
                path,
                "admission.deadline_margin",
                "must be at least 1",
            ));
        }
        self.governor.validate(path)?;
        self.pool.validate(path)?;
        for (key, value) in [
            ("intervals.guest_poll", self.intervals.guest_poll),
            ("intervals.lease_gc", self.intervals.lease_gc),
            ("intervals.reconcile", self.intervals.reconcile),
            ("intervals.retention_gc", self.intervals.retention_gc),
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

    /// Puts `tuning` in force.
    pub fn put(&self, tuning: Tuning) {
        let fresh = Arc::new(tuning);
        match self.0.write() {
            Ok(mut guard) => *guard = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
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
    fn the_host_presets_follow_the_sizing_table() {
        let load = |name: &str| Tuning::load(&Path::new(SHIPPED).join(name)).unwrap();
        let (small, medium, large) = (
            load("small-host.yaml"),
            load("medium-host.yaml"),
            load("large-host.yaml"),
        );
        assert_eq!(
            [
                small.admission.max_concurrent,
                medium.admission.max_concurrent,
                large.admission.max_concurrent
            ],
            [3, 5, 10]
        );
        for preset in [&small, &medium, &large, &load("default.yaml")] {
            assert!(preset.governor.enabled);
            assert_eq!(
                preset.governor.budget,
                super::super::governor::Budget::default()
            );
        }
        assert!(small.governor.boot_cap.max < large.governor.boot_cap.max);
        for preset in [&small, &medium, &large, &load("default.yaml")] {
            assert!(preset.snapshots_enabled());
        }
    }

    fn parse(text: &str) -> Result<Tuning, ConfigError> {
        let path = Path::new("/etc/agentlab/tuning/t.yaml");
        let tuning: Tuning = super::super::parse_yaml(path, text)?;
        tuning.validate(path)?;
        Ok(tuning)
    }

    #[test]
    fn governor_off_and_on_are_switches_and_a_mapping_sets_keys() {
        for (text, enabled) in [
            ("governor: off\n", false),
            ("governor: false\n", false),
            ("governor: on\n", true),
            ("{}\n", true),
            ("governor: {enabled: false}\n", false),
        ] {
            let tuning = parse(text).unwrap();
            assert_eq!(tuning.governor.enabled, enabled, "{text}");
            assert_eq!(tuning.governor.budget.memory_reserve_mb, 4096, "{text}");
        }
        let tuning = parse(
            "governor:\n  sample_interval: 500ms\n  signals: {cpu_pressure: null, iowait: {trip: 50, clear: 25}}\n  boot_cap: {initial: 1, max: 2}\n",
        )
        .unwrap();
        let g = &tuning.governor;
        assert_eq!(g.sample_interval, Duration::from_millis(500));
        assert_eq!(g.signals.cpu_pressure, None);
        assert_eq!(g.signals.iowait.map(|t| t.trip), Some(50.0));
        assert!(
            g.signals.io_pressure.is_some(),
            "unset keys keep their defaults"
        );
        assert_eq!((g.boot_cap.min, g.boot_cap.max), (1, 2));
    }

    #[test]
    fn a_bad_governor_value_names_its_key() {
        for (text, key) in [
            ("governor: maybe\n", "governor"),
            ("governor: {budget: {typo: 1}}\n", "governor.budget"),
            (
                "governor: {signals: {cpu_pressure: {trip: 10, clear: 20}}}\n",
                "governor.signals.cpu_pressure",
            ),
            (
                "governor: {signals: {memory_available_mb: {trip: 4096, clear: 2048}}}\n",
                "governor.signals.memory_available_mb",
            ),
            (
                "governor: {signals: {io_stall: {trip: 5, clear: 5}}}\n",
                "governor.signals.io_stall",
            ),
            (
                "governor: {boot_cap: {min: 3, max: 2, initial: 2}}\n",
                "governor.boot_cap.max",
            ),
            (
                "governor: {boot_cap: {decrease: 1.5}}\n",
                "governor.boot_cap.decrease",
            ),
            (
                "governor: {sample_interval: 1ms}\n",
                "governor.sample_interval",
            ),
            (
                "admission: {deadline_margin: 0.5}\n",
                "admission.deadline_margin",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn snapshot_starts_are_on_unless_the_tuning_turns_them_off() {
        assert!(parse("{}\n").unwrap().snapshots_enabled());
        assert!(parse("snapshots: {}\n").unwrap().snapshots_enabled());
        assert!(!parse("snapshots: {enabled: false}\n")
            .unwrap()
            .snapshots_enabled());
        let err = parse("snapshots: {enable: false}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("snapshots") && err.contains("enable"), "{err}");
        let err = parse("snapshots: {enabled: sometimes}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("snapshots.enabled"), "{err}");
    }

    #[test]
    fn a_reload_turns_snapshot_starts_off_and_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.yaml");
        let handle = TuningHandle::new(Tuning::default());
        assert!(handle.get().snapshots_enabled());
        std::fs::write(&path, "snapshots:\n  enabled: false\n").unwrap();
        handle.reload(&path).unwrap();
        assert!(!handle.get().snapshots_enabled());
        std::fs::write(&path, "snapshots: {enabled: true}\n").unwrap();
        handle.reload(&path).unwrap();
        assert!(handle.get().snapshots_enabled());
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
