//! One sample of the host: CPU (overall, per core, load average), memory and swap, iowait, PSI, and
//! free space on the storage path. Any part may be missing; `notes` says why and what replaces it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostReadings {
    pub cpu: CpuReadings,
    pub memory: MemoryReadings,
    /// Share of CPU time spent in iowait since the previous sample, %. None on the first sample.
    pub iowait_percent: Option<f64>,
    /// Pressure stall information; None where `/proc/pressure` is absent or unreadable.
    pub pressure: Option<Pressure>,
    pub disk: Option<DiskReadings>,
    /// What could not be read, and what the governor uses instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuReadings {
    /// Physical cores (the static vCPU rule counts these).
    pub physical_cores: u32,
    /// Logical CPUs (threads).
    pub logical_cpus: u32,
    pub usage_percent: f64,
    pub per_core_percent: Vec<f64>,
    pub load_average: LoadAverage,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadAverage {
    pub one: f64,
    pub five: f64,
    pub fifteen: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryReadings {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_used_bytes: u64,
}

/// `some` and `full` avg10 of one PSI resource, in %.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Stall {
    pub some_avg10: f64,
    /// None where the kernel has no `full` line (cpu before Linux 5.13).
    pub full_avg10: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Pressure {
    pub cpu: Stall,
    pub io: Stall,
    pub memory: Stall,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskReadings {
    pub path: PathBuf,
    pub total_bytes: u64,
    /// Free space an unprivileged writer can use.
    pub available_bytes: u64,
}

impl HostReadings {
    /// Cores for the static vCPU rule: physical cores, or logical CPUs where those are unknown.
    pub fn cores(&self) -> u32 {
        if self.cpu.physical_cores > 0 {
            self.cpu.physical_cores
        } else {
            self.cpu.logical_cpus
        }
    }

    pub fn memory_total_mb(&self) -> f64 {
        self.memory.total_bytes as f64 / MIB
    }

    pub fn memory_available_mb(&self) -> f64 {
        self.memory.available_bytes as f64 / MIB
    }

    /// The 1-minute load average per logical CPU.
    pub fn load_per_core(&self) -> Option<f64> {
        (self.cpu.logical_cpus > 0)
            .then(|| self.cpu.load_average.one / f64::from(self.cpu.logical_cpus))
    }

    pub fn disk_free_percent(&self) -> Option<f64> {
        self.disk
            .as_ref()
            .filter(|d| d.total_bytes > 0)
            .map(|d| d.available_bytes as f64 * 100.0 / d.total_bytes as f64)
    }
}
