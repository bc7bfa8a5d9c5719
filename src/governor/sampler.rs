//! Reading the host. [`HostSampler`] takes CPU use (overall and per core), the load average,
//! available memory and swap from sysinfo; iowait from `/proc/stat` and PSI from `/proc/pressure`
//! through procfs; free space on the storage path through statvfs. Every read is blocking (procfs
//! files, a syscall), so callers run `sample` off the async executor.
//!
//! Where a source is missing the reading says so in `notes`: without PSI (a kernel built without
//! it, or booted with `psi=0`) the governor falls back to the load average for cpu, iowait for io
//! and available memory for memory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use super::readings::{
    CpuReadings, DiskReadings, HostReadings, LoadAverage, MemoryReadings, Pressure, Stall,
};

/// Where host readings come from: the host itself, or (in tests) readings set by hand.
pub trait Sampler: Send + std::fmt::Debug + 'static {
    /// Reads the host; `storage` is where sandbox disks live. Blocking.
    fn sample(&mut self, storage: &Path) -> HostReadings;
}

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Parse { path: &'static str, message: String },
    #[error("{path}: no `some` line")]
    NoSomeLine { path: &'static str },
    #[error("statvfs on {path}: {source}")]
    Statvfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("/proc/stat: {0}")]
    Stat(String),
}

/// The `/proc/stat` counters iowait is computed from.
#[derive(Debug, Clone, Copy)]
struct StatTotals {
    iowait: u64,
    total: u64,
}

#[derive(Debug)]
pub struct HostSampler {
    system: Option<System>,
    system_error: Option<String>,
    physical_cores: u32,
    previous: Option<StatTotals>,
}

const PSI_FALLBACK: &str =
    "cpu falls back to the load average, io to iowait, memory to available memory";

impl HostSampler {
    /// Sets up sysinfo (a first CPU refresh, so the next one has a difference to report).
    /// Blocking: it reads `/proc/cpuinfo` once for the physical core count.
    pub fn new() -> HostSampler {
        let kind = RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing().with_usage())
            .with_memory(MemoryRefreshKind::everything());
        let (system, system_error) = match System::new_with_specifics(kind) {
            Ok(system) => (Some(system), None),
            Err(err) => (None, Some(format!("sysinfo unavailable: {err}"))),
        };
        let physical_cores = System::physical_core_count()
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        HostSampler {
            system,
            system_error,
            physical_cores,
            previous: None,
        }
    }

    fn cpu_and_memory(&mut self, readings: &mut HostReadings) {
        let Some(system) = self.system.as_mut() else {
            if let Some(err) = &self.system_error {
                readings.notes.push(err.clone());
            }
            return;
        };
        system.refresh_cpu_usage();
        system.refresh_memory();
        let cpus = system.cpus();
        readings.cpu = CpuReadings {
            physical_cores: self.physical_cores,
            logical_cpus: u32::try_from(cpus.len()).unwrap_or(u32::MAX),
            usage_percent: f64::from(system.global_cpu_usage()),
            per_core_percent: cpus.iter().map(|c| f64::from(c.usage())).collect(),
            load_average: match System::load_average() {
                Ok(load) => LoadAverage {
                    one: load.one,
                    five: load.five,
                    fifteen: load.fifteen,
                },
                Err(err) => {
                    readings
                        .notes
                        .push(format!("load average unavailable: {err}"));
                    LoadAverage::default()
                }
            },
        };
        readings.memory = MemoryReadings {
            total_bytes: system.total_memory(),
            available_bytes: system.available_memory(),
            swap_total_bytes: system.total_swap(),
            swap_used_bytes: system.used_swap(),
        };
    }

    fn iowait(&mut self) -> Result<Option<f64>, SampleError> {
        let stats = read_stat()?;
        let previous = self.previous.replace(stats);
        Ok(previous.and_then(|before| {
            let total = stats.total.checked_sub(before.total)?;
            // iowait may go backwards (see proc(5)); such a sample says nothing.
            let iowait = stats.iowait.checked_sub(before.iowait)?;
            (total > 0).then(|| iowait as f64 * 100.0 / total as f64)
        }))
    }
}

impl Default for HostSampler {
    fn default() -> Self {
        HostSampler::new()
    }
}

impl Sampler for HostSampler {
    fn sample(&mut self, storage: &Path) -> HostReadings {
        let mut readings = HostReadings::default();
        self.cpu_and_memory(&mut readings);
        match self.iowait() {
            Ok(iowait) => readings.iowait_percent = iowait,
            Err(err) => readings.notes.push(format!("iowait unavailable: {err}")),
        }
        match read_pressure() {
            Ok(pressure) => readings.pressure = Some(pressure),
            Err(err) => readings
                .notes
                .push(format!("PSI unavailable ({err}); {PSI_FALLBACK}")),
        }
        match disk(storage) {
            Ok(disk) => readings.disk = Some(disk),
            Err(err) => readings.notes.push(format!(
                "storage space unavailable ({err}); the disk rule is not applied"
            )),
        }
        readings
    }
}

fn read_stat() -> Result<StatTotals, SampleError> {
    use procfs::CurrentSI;
    let stats = procfs::KernelStats::current().map_err(|e| SampleError::Stat(e.to_string()))?;
    let t = &stats.total;
    let iowait = t.iowait.unwrap_or(0);
    let total = [
        t.user,
        t.nice,
        t.system,
        t.idle,
        iowait,
        t.irq.unwrap_or(0),
        t.softirq.unwrap_or(0),
        t.steal.unwrap_or(0),
    ]
    .iter()
    .fold(0u64, |sum, v| sum.saturating_add(*v));
    Ok(StatTotals { iowait, total })
}

/// One `/proc/pressure/*` file. The `full` line is optional: cpu has none before Linux 5.13.
fn read_stall(path: &'static str) -> Result<Stall, SampleError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| SampleError::Read { path, source })?;
    let parse = |line: &str| {
        procfs::parse_pressure_record(line)
            .map(|r| f64::from(r.avg10))
            .map_err(|e| SampleError::Parse {
                path,
                message: e.to_string(),
            })
    };
    let mut some = None;
    let mut full = None;
    for line in text.lines() {
        if line.starts_with("some ") {
            some = Some(parse(line)?);
        } else if line.starts_with("full ") {
            full = Some(parse(line)?);
        }
    }
    Ok(Stall {
        some_avg10: some.ok_or(SampleError::NoSomeLine { path })?,
        full_avg10: full,
    })
}

fn read_pressure() -> Result<Pressure, SampleError> {
    Ok(Pressure {
        cpu: read_stall("/proc/pressure/cpu")?,
        io: read_stall("/proc/pressure/io")?,
        memory: read_stall("/proc/pressure/memory")?,
    })
}

/// Free space on the filesystem holding `path` (or its nearest existing ancestor, so a storage
/// folder not made yet still reads).
fn disk(path: &Path) -> Result<DiskReadings, SampleError> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let stat = rustix::fs::statvfs(existing).map_err(|e| SampleError::Statvfs {
        path: existing.to_owned(),
        source: e.into(),
    })?;
    Ok(DiskReadings {
        path: path.to_owned(),
        total_bytes: stat.f_blocks.saturating_mul(stat.f_frsize),
        available_bytes: stat.f_bavail.saturating_mul(stat.f_frsize),
    })
}

/// Readings set by hand and shared with whoever holds a clone: tests inject host states with it.
#[derive(Debug, Clone, Default)]
pub struct ManualSampler(Arc<Mutex<HostReadings>>);

impl ManualSampler {
    pub fn new(readings: HostReadings) -> Self {
        ManualSampler(Arc::new(Mutex::new(readings)))
    }

    pub fn set(&self, readings: HostReadings) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = readings;
    }

    /// Changes the current readings in place.
    pub fn update(&self, change: impl FnOnce(&mut HostReadings)) {
        change(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

impl Sampler for ManualSampler {
    fn sample(&mut self, _storage: &Path) -> HostReadings {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_sampler_reads_this_host() {
        let dir = tempfile::tempdir().unwrap();
        let mut sampler = HostSampler::new();
        let first = sampler.sample(dir.path());
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let second = sampler.sample(&dir.path().join("not/made/yet"));
        assert!(second.cpu.logical_cpus > 0, "{second:?}");
        assert_eq!(
            second.cpu.per_core_percent.len() as u32,
            second.cpu.logical_cpus
        );
        assert!(second.memory.total_bytes > 0 && second.memory.available_bytes > 0);
        assert!(
            first.iowait_percent.is_none(),
            "the first sample has no difference"
        );
        assert!(second.iowait_percent.is_some(), "{second:?}");
        let disk = second.disk.as_ref().unwrap();
        assert!(disk.total_bytes >= disk.available_bytes && disk.total_bytes > 0);
        // PSI is present on this kernel or its absence is explained.
        assert!(
            second.pressure.is_some() || second.notes.iter().any(|n| n.contains("PSI unavailable")),
            "{second:?}"
        );
    }

    #[test]
    fn a_missing_pressure_file_is_an_error_that_names_it() {
        let err = read_stall("/proc/pressure/nonexistent")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/proc/pressure/nonexistent"), "{err}");
    }
}
