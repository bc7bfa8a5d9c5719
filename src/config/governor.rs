//! The `governor:` section of tuning: the ResourceGovernor's switch, its sampling interval, the
//! static budget (the performance document's "do not exceed" rules), the dynamic signals with their
//! hysteresis, and the adaptive cap on sandboxes in their boot phases.
//!
//! `governor: off` (or `false`) is shorthand for every default with admission ungoverned; it exists
//! to compare against. A mapping sets any of the keys below, the rest keep their defaults.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::ConfigError;

/// A dynamic signal's hysteresis: it trips when the value reaches `trip` and clears only once the
/// value is back past `clear`. With `trip` above `clear` high values are bad (pressure); with
/// `trip` below `clear` low values are bad (available memory).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    pub trip: f64,
    pub clear: f64,
}

impl Threshold {
    pub const fn new(trip: f64, clear: f64) -> Self {
        Threshold { trip, clear }
    }

    /// True when low values are the bad ones.
    pub fn trips_below(&self) -> bool {
        self.trip < self.clear
    }
}

/// The static budget: what the sandboxes alive may hold, whatever the host readings say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    /// Physical memory kept for the host (Proxmox, the daemon, page cache).
    pub memory_reserve_mb: u64,
    /// What a sandbox costs beyond its profile's memory (QEMU and its OS overhead).
    pub sandbox_overhead_mb: u64,
    /// Committed vCPUs stay within physical cores × this.
    pub vcpus_per_core: f64,
    /// The storage keeps this share free after a new sandbox's disk. None (`null`): no disk rule,
    /// for thin storage watched some other way.
    pub disk_min_free_percent: Option<f64>,
    /// What a sandbox costs on disk beyond its profile's disk (metadata, logs).
    pub sandbox_disk_overhead_mb: u64,
    /// On thin storage (qcow2 overlays, LVM-thin, ZFS), how much a sandbox's disk may still grow:
    /// the disk rule sets this aside per sandbox (less what its disk already takes, at most its
    /// virtual size) instead of the virtual size.
    pub sandbox_disk_growth_mb: u64,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            memory_reserve_mb: 4096,
            sandbox_overhead_mb: 200,
            vcpus_per_core: 2.0,
            disk_min_free_percent: Some(20.0),
            sandbox_disk_overhead_mb: 500,
            // A clone of a repository, its dependencies and a build's output: a few GB for most
            // jobs. The keep-free share is the margin for the job that writes more.
            sandbox_disk_growth_mb: 4096,
        }
    }
}

/// The dynamic signals. Each is optional (`null` turns it off). PSI values are the `avg10`
/// percentages of `/proc/pressure/*`; where PSI is absent, cpu falls back to `load_per_core`, io to
/// `iowait` and memory to `memory_available_mb`, which apply with or without PSI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Signals {
    /// PSI cpu `some` avg10, %.
    pub cpu_pressure: Option<Threshold>,
    /// PSI io `some` avg10, %.
    pub io_pressure: Option<Threshold>,
    /// PSI io `full` avg10, %.
    pub io_stall: Option<Threshold>,
    /// PSI memory `some` avg10, %.
    pub memory_pressure: Option<Threshold>,
    /// PSI memory `full` avg10, %.
    pub memory_stall: Option<Threshold>,
    /// Share of CPU time in iowait over the last sample (`/proc/stat`), %.
    pub iowait: Option<Threshold>,
    /// `MemAvailable`, MB; trips below `trip`.
    pub memory_available_mb: Option<Threshold>,
    /// 1-minute load average per logical CPU; only where PSI is absent.
    pub load_per_core: Option<Threshold>,
}

impl Default for Signals {
    fn default() -> Self {
        Signals {
            cpu_pressure: Some(Threshold::new(60.0, 30.0)),
            io_pressure: Some(Threshold::new(40.0, 20.0)),
            io_stall: Some(Threshold::new(20.0, 10.0)),
            memory_pressure: Some(Threshold::new(20.0, 5.0)),
            memory_stall: Some(Threshold::new(5.0, 1.0)),
            iowait: Some(Threshold::new(30.0, 15.0)),
            memory_available_mb: Some(Threshold::new(2048.0, 4096.0)),
            load_per_core: Some(Threshold::new(2.0, 1.25)),
        }
    }
}

impl Signals {
    /// Every signal with its key, for validation and display.
    pub fn all(&self) -> [(&'static str, Option<Threshold>); 8] {
        [
            ("cpu_pressure", self.cpu_pressure),
            ("io_pressure", self.io_pressure),
            ("io_stall", self.io_stall),
            ("memory_pressure", self.memory_pressure),
            ("memory_stall", self.memory_stall),
            ("iowait", self.iowait),
            ("memory_available_mb", self.memory_available_mb),
            ("load_per_core", self.load_per_core),
        ]
    }
}

/// The adaptive cap on sandboxes in their boot phases (clone, start, cloud_init, guest_agent):
/// additive increase while boots finish on time with the cap in use, multiplicative decrease when
/// a boot is slow or times out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootCapTuning {
    /// Where the cap starts when the daemon starts.
    pub initial: f64,
    pub min: u32,
    pub max: u32,
    /// Added to the cap per cap's worth of on-time boots (`cap += increase / cap` per boot, the
    /// cap rounded down).
    pub increase: f64,
    /// The cap is multiplied by this on a slow boot or a boot timeout.
    pub decrease: f64,
    /// A boot is slow past `slow_factor` × the fastest of the last `baseline_boots` boots...
    pub slow_factor: f64,
    pub baseline_boots: u32,
    /// ...or past this, whatever the baseline...
    #[serde(with = "humantime_serde")]
    pub expected: Duration,
    /// ...or when one boot phase took more than this share of its timeout.
    pub timeout_fraction: f64,
}

impl Default for BootCapTuning {
    fn default() -> Self {
        BootCapTuning {
            // Slow start: the first boot measures the host before any two run together.
            initial: 1.0,
            min: 1,
            max: 5,
            increase: 1.0,
            decrease: 0.5,
            slow_factor: 2.0,
            baseline_boots: 20,
            expected: Duration::from_secs(60),
            timeout_fraction: 0.5,
        }
    }
}

/// The whole `governor:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GovernorTuning {
    /// Off: jobs are admitted up to `admission.max_concurrent` whatever the host says (readings
    /// are still taken and shown).
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
    /// Below this many live sandboxes the dynamic signals do not hold the queue, so outside load
    /// on the host slows AgentLab down but never stops it.
    pub progress_floor: u32,
    /// Where sandbox disks live, for the disk rule. None: the daemon's `data_dir`.
    pub storage_path: Option<PathBuf>,
    pub budget: Budget,
    pub signals: Signals,
    pub boot_cap: BootCapTuning,
}

impl Default for GovernorTuning {
    fn default() -> Self {
        GovernorTuning {
            enabled: true,
            sample_interval: Duration::from_secs(1),
            progress_floor: 1,
            storage_path: None,
            budget: Budget::default(),
            signals: Signals::default(),
            boot_cap: BootCapTuning::default(),
        }
    }
}

/// The section as written: a switch (`off`, `on`, `false`, `true`) or a mapping.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct GovernorSection(pub GovernorTuning);

impl<'de> Deserialize<'de> for GovernorSection {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SectionVisitor;

        impl SectionVisitor {
            fn switch(enabled: bool) -> GovernorSection {
                GovernorSection(GovernorTuning {
                    enabled,
                    ..GovernorTuning::default()
                })
            }
        }

        impl<'de> Visitor<'de> for SectionVisitor {
            type Value = GovernorSection;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`on`, `off`, or a mapping of governor settings")
            }

            fn visit_bool<E: de::Error>(self, value: bool) -> Result<Self::Value, E> {
                Ok(Self::switch(value))
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
                match value {
                    "on" | "true" => Ok(Self::switch(true)),
                    "off" | "false" => Ok(Self::switch(false)),
                    other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                GovernorTuning::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(GovernorSection)
            }
        }

        deserializer.deserialize_any(SectionVisitor)
    }
}

impl std::ops::Deref for GovernorSection {
    type Target = GovernorTuning;
    fn deref(&self) -> &GovernorTuning {
        &self.0
    }
}

impl std::ops::DerefMut for GovernorSection {
    fn deref_mut(&mut self) -> &mut GovernorTuning {
        &mut self.0
    }
}

impl GovernorTuning {
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| {
            Err(ConfigError::invalid(
                path,
                &format!("governor.{key}"),
                message,
            ))
        };
        if self.sample_interval < Duration::from_millis(100) {
            return bad("sample_interval", "must be at least 100ms");
        }
        let b = &self.budget;
        if !(b.vcpus_per_core.is_finite() && b.vcpus_per_core > 0.0) {
            return bad("budget.vcpus_per_core", "must be above 0");
        }
        if b.disk_min_free_percent
            .is_some_and(|p| !(0.0..100.0).contains(&p))
        {
            return bad(
                "budget.disk_min_free_percent",
                "must be at least 0 and below 100",
            );
        }
        for (key, threshold) in self.signals.all() {
            let Some(t) = threshold else { continue };
            if !(t.trip.is_finite() && t.clear.is_finite()) || t.trip < 0.0 || t.clear < 0.0 {
                return bad(
                    &format!("signals.{key}"),
                    "trip and clear must be numbers of at least 0",
                );
            }
            if t.trip == t.clear {
                return bad(
                    &format!("signals.{key}"),
                    "trip and clear must differ (the gap between them is the hysteresis)",
                );
            }
            let wrong_way = if key == "memory_available_mb" {
                !t.trips_below()
            } else {
                t.trips_below()
            };
            if wrong_way {
                let message = if key == "memory_available_mb" {
                    "trips on low values: `trip` must be below `clear`"
                } else {
                    "trips on high values: `trip` must be above `clear`"
                };
                return bad(&format!("signals.{key}"), message);
            }
        }
        let c = &self.boot_cap;
        if c.min == 0 {
            return bad("boot_cap.min", "must be at least 1");
        }
        if c.max < c.min {
            return bad("boot_cap.max", "must be at least boot_cap.min");
        }
        if !(c.initial.is_finite()
            && c.initial >= f64::from(c.min)
            && c.initial <= f64::from(c.max))
        {
            return bad(
                "boot_cap.initial",
                "must be between boot_cap.min and boot_cap.max",
            );
        }
        if !(c.increase.is_finite() && c.increase > 0.0) {
            return bad("boot_cap.increase", "must be above 0");
        }
        if !(c.decrease > 0.0 && c.decrease < 1.0) {
            return bad("boot_cap.decrease", "must be above 0 and below 1");
        }
        if !(c.slow_factor.is_finite() && c.slow_factor > 1.0) {
            return bad("boot_cap.slow_factor", "must be above 1");
        }
        if c.baseline_boots == 0 {
            return bad("boot_cap.baseline_boots", "must be at least 1");
        }
        if c.expected.is_zero() {
            return bad("boot_cap.expected", "must be above 0");
        }
        if !(c.timeout_fraction > 0.0 && c.timeout_fraction <= 1.0) {
            return bad("boot_cap.timeout_fraction", "must be above 0 and at most 1");
        }
        Ok(())
    }
}
