//! The warm pool's tuning (`pool:`): how many READY sandboxes each profile keeps waiting for a
//! job, and how long one may wait before it is replaced. Reloaded with the rest of the tuning.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::profile::Profiles;
use super::ConfigError;

/// The most sandboxes one profile's pool may hold: a typo must not boot a hundred VMs.
pub const MAX_PER_PROFILE: u32 = 32;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolTuning {
    /// Profile name → READY sandboxes to keep. A profile left out has no pool.
    pub profiles: BTreeMap<String, u32>,
    /// A pool sandbox idle for longer than this is destroyed and replaced by a fresh one.
    #[serde(with = "humantime_serde")]
    pub max_idle: Duration,
}

impl Default for PoolTuning {
    fn default() -> Self {
        PoolTuning {
            profiles: BTreeMap::new(),
            max_idle: Duration::from_secs(30 * 60),
        }
    }
}

impl PoolTuning {
    /// The number of sandboxes `profile`'s pool keeps (0: none).
    pub fn target(&self, profile: &str) -> u32 {
        self.profiles.get(profile).copied().unwrap_or(0)
    }

    /// Whether any profile keeps a pool.
    pub fn is_empty(&self) -> bool {
        self.profiles.values().all(|n| *n == 0)
    }

    pub(super) fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if self.max_idle < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                path,
                "pool.max_idle",
                "must be at least 1s",
            ));
        }
        for (name, count) in &self.profiles {
            if *count > MAX_PER_PROFILE {
                return Err(ConfigError::invalid(
                    path,
                    &format!("pool.profiles.{name}"),
                    format!("at most {MAX_PER_PROFILE} sandboxes per profile"),
                ));
            }
        }
        Ok(())
    }

    /// Every profile the pool names must exist; tuning and profiles load apart, so this is
    /// checked once both are in.
    pub fn check_profiles(&self, path: &Path, profiles: &Profiles) -> Result<(), ConfigError> {
        for name in self.profiles.keys() {
            if profiles.get(name).is_none() {
                return Err(ConfigError::invalid(
                    path,
                    &format!("pool.profiles.{name}"),
                    format!(
                        "no such profile (there are: {})",
                        profiles.names().join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PoolTuning, ConfigError> {
        let path = Path::new("pool.yaml");
        let pool: PoolTuning = super::super::parse_yaml(path, text)?;
        pool.validate(path)?;
        Ok(pool)
    }

    #[test]
    fn reads_sizes_and_max_idle_and_names_the_bad_key() {
        let pool = parse("profiles: {high-throughput: 2, balanced: 1}\nmax_idle: 10m\n").unwrap();
        assert_eq!(pool.target("high-throughput"), 2);
        assert_eq!(pool.target("interactive-dev"), 0);
        assert_eq!(pool.max_idle, Duration::from_secs(600));
        assert!(!pool.is_empty());
        assert!(parse("{}").unwrap().is_empty());
        let err = parse("profiles: {balanced: 500}").unwrap_err().to_string();
        assert!(
            err.contains("pool.profiles.balanced") && err.contains("at most 32"),
            "{err}"
        );
        let err = parse("max_idle: 0s").unwrap_err().to_string();
        assert!(err.contains("pool.max_idle"), "{err}");
        let err = parse("profiles: {balanced: -1}").unwrap_err().to_string();
        assert!(err.contains("profiles"), "{err}");
    }

    #[test]
    fn a_pool_for_a_missing_profile_is_refused_with_the_ones_there_are() {
        let shipped = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/profiles"));
        let profiles = Profiles::load_dir(shipped).unwrap();
        let pool = parse("profiles: {balanced: 1, nope: 1}").unwrap();
        let err = pool
            .check_profiles(Path::new("t.yaml"), &profiles)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pool.profiles.nope"), "{err}");
        assert!(err.contains("balanced"), "{err}");
        parse("profiles: {balanced: 1}")
            .unwrap()
            .check_profiles(Path::new("t.yaml"), &profiles)
            .unwrap();
    }
}
