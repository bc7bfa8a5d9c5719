//! The admission policy. Pure: given the host readings, the tuning, what live sandboxes hold and
//! what the queue's head asks for, it says Admit, Wait (with the reason) or Never (the job cannot
//! fit this host even when idle). It keeps two pieces of state, both fed explicitly: the hysteresis
//! of each dynamic signal (updated once per sample by [`Policy::observe`]) and the boot cap
//! (updated per boot outcome).
//!
//! The rules, in the order they are checked:
//! 1. static budget: committed memory plus `sandbox_overhead_mb` per sandbox stays within physical
//!    memory minus `memory_reserve_mb`; committed vCPUs stay within cores × `vcpus_per_core`; the
//!    storage keeps `disk_min_free_percent` free after the new sandbox (unless that is `null`).
//!    On thick storage that sets aside the virtual size of the new disk and of disks still
//!    booting; on thin storage (as the backend reports it) what is left of every live sandbox's
//!    growth reserve beyond what its disk already takes, plus the new one's reserve. A job that
//!    breaks a static rule with none of our sandboxes running can never start: Never;
//! 2. the boot cap: sandboxes in clone/start/cloud_init/guest_agent stay below it;
//! 3. dynamic signals with hysteresis (PSI, iowait, available memory; load average where PSI is
//!    absent), which hold the queue only once `progress_floor` sandboxes are live.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::boot_cap::{BootCap, BootOutcome, CapChange};
use super::readings::HostReadings;
use crate::backend::{DiskUsage, Provisioning};
use crate::config::governor::{GovernorTuning, Signals, Threshold};
use crate::config::profile::Profile;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// Why the queue's head waits. The metric `agentlab_governor_throttled{reason}` uses these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Throttle {
    Cpu,
    Memory,
    Io,
    Disk,
    BootCap,
}

impl Throttle {
    pub const ALL: [Throttle; 5] = [
        Throttle::Cpu,
        Throttle::Memory,
        Throttle::Io,
        Throttle::Disk,
        Throttle::BootCap,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Throttle::Cpu => "cpu",
            Throttle::Memory => "memory",
            Throttle::Io => "io",
            Throttle::Disk => "disk",
            Throttle::BootCap => "boot_cap",
        }
    }
}

impl fmt::Display for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rule that holds a job back, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Block {
    pub reason: Throttle,
    pub detail: String,
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Admit,
    /// Not now; every rule that holds it back, the first one first.
    Wait(Vec<Block>),
    /// Not on this host, even with nothing else running.
    Never(Block),
}

/// What one sandbox asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand {
    pub vcpus: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
}

impl Demand {
    pub fn of(profile: &Profile) -> Demand {
        Demand {
            vcpus: profile.resources.cores,
            memory_mb: profile.resources.memory_mb,
            disk_gb: profile.storage.root_size_gb,
        }
    }
}

/// What the live sandboxes hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub sandboxes: u32,
    pub vcpus: u64,
    pub memory_mb: u64,
    pub disk_gb: u64,
    /// Sandboxes in clone, start, cloud_init or guest_agent (or admitted and not yet cloning).
    pub booting: u32,
    pub booting_disk_gb: u64,
    /// How the backend's storage provisions the disks below (thick unless it said thin).
    #[serde(default)]
    pub provisioning: Provisioning,
    /// Each sandbox's disk, with what it really takes where the backend measured it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<SandboxDisk>,
}

/// One live sandbox's disk as the disk rule sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxDisk {
    /// The VM's name, which the backend's measurement is keyed by.
    pub vm: String,
    pub virtual_gb: u64,
    /// Bytes it occupies on the storage; None before the backend has measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_bytes: Option<u64>,
}

impl Committed {
    /// Counts one more sandbox, not measured yet (an admitted job's disk has taken nothing).
    pub fn add(&mut self, demand: &Demand, booting: bool) {
        self.add_named(demand, booting, String::new());
    }

    /// Counts one more sandbox whose VM is (or will be) named `vm`.
    pub fn add_named(&mut self, demand: &Demand, booting: bool, vm: String) {
        self.sandboxes += 1;
        self.vcpus += u64::from(demand.vcpus);
        self.memory_mb += demand.memory_mb;
        self.disk_gb += demand.disk_gb;
        if booting {
            self.booting += 1;
            self.booting_disk_gb += demand.disk_gb;
        }
        self.disks.push(SandboxDisk {
            vm,
            virtual_gb: demand.disk_gb,
            allocated_bytes: None,
        });
    }

    /// Stops counting an idle sandbox named `vm` (one the pool would give up to make room).
    pub fn remove_named(&mut self, demand: &Demand, vm: &str) {
        self.sandboxes = self.sandboxes.saturating_sub(1);
        self.vcpus = self.vcpus.saturating_sub(u64::from(demand.vcpus));
        self.memory_mb = self.memory_mb.saturating_sub(demand.memory_mb);
        self.disk_gb = self.disk_gb.saturating_sub(demand.disk_gb);
        if let Some(at) = self.disks.iter().position(|d| d.vm == vm) {
            self.disks.remove(at);
        }
    }

    /// Takes in the backend's measurement: its provisioning, and what each disk really takes.
    pub fn measured(&mut self, usage: &DiskUsage) {
        self.provisioning = usage.provisioning;
        for disk in &mut self.disks {
            disk.allocated_bytes = usage.allocated.get(&disk.vm).copied();
        }
    }
}

/// The static budget as it applies to this host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Budgets {
    /// Physical memory minus the reserve, MB: what sandboxes (with their overhead) may hold.
    pub memory_mb: u64,
    pub sandbox_overhead_mb: u64,
    /// Cores × `vcpus_per_core`.
    pub vcpus: u64,
    /// Free space the storage keeps, bytes; None without a storage reading.
    pub disk_keep_free_bytes: Option<u64>,
    pub disk_available_bytes: Option<u64>,
}

impl Budgets {
    pub fn of(tuning: &GovernorTuning, readings: &HostReadings) -> Budgets {
        let b = &tuning.budget;
        let total_mb = readings.memory.total_bytes / MIB;
        Budgets {
            memory_mb: total_mb.saturating_sub(b.memory_reserve_mb),
            sandbox_overhead_mb: b.sandbox_overhead_mb,
            vcpus: (f64::from(readings.cores()) * b.vcpus_per_core).floor() as u64,
            disk_keep_free_bytes: readings
                .disk
                .as_ref()
                .zip(b.disk_min_free_percent)
                .map(|(d, percent)| (d.total_bytes as f64 * percent / 100.0) as u64),
            disk_available_bytes: readings.disk.as_ref().map(|d| d.available_bytes),
        }
    }

    /// Memory the committed sandboxes hold, overhead included, MB.
    pub fn memory_used_mb(&self, committed: &Committed) -> u64 {
        committed.memory_mb + u64::from(committed.sandboxes) * self.sandbox_overhead_mb
    }
}

/// The dynamic signals, each mapped to the reason it throttles for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    CpuPressure,
    IoPressure,
    IoStall,
    MemoryPressure,
    MemoryStall,
    Iowait,
    MemoryAvailableMb,
    LoadPerCore,
}

impl Signal {
    pub const ALL: [Signal; 8] = [
        Signal::CpuPressure,
        Signal::IoPressure,
        Signal::IoStall,
        Signal::MemoryPressure,
        Signal::MemoryStall,
        Signal::Iowait,
        Signal::MemoryAvailableMb,
        Signal::LoadPerCore,
    ];

    fn index(self) -> usize {
        self as usize
    }

    pub fn key(self) -> &'static str {
        match self {
            Signal::CpuPressure => "cpu_pressure",
            Signal::IoPressure => "io_pressure",
            Signal::IoStall => "io_stall",
            Signal::MemoryPressure => "memory_pressure",
            Signal::MemoryStall => "memory_stall",
            Signal::Iowait => "iowait",
            Signal::MemoryAvailableMb => "memory_available_mb",
            Signal::LoadPerCore => "load_per_core",
        }
    }

    pub fn reason(self) -> Throttle {
        match self {
            Signal::CpuPressure | Signal::LoadPerCore => Throttle::Cpu,
            Signal::IoPressure | Signal::IoStall | Signal::Iowait => Throttle::Io,
            Signal::MemoryPressure | Signal::MemoryStall | Signal::MemoryAvailableMb => {
                Throttle::Memory
            }
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Signal::CpuPressure => "PSI cpu some avg10",
            Signal::IoPressure => "PSI io some avg10",
            Signal::IoStall => "PSI io full avg10",
            Signal::MemoryPressure => "PSI memory some avg10",
            Signal::MemoryStall => "PSI memory full avg10",
            Signal::Iowait => "iowait",
            Signal::MemoryAvailableMb => "available memory",
            Signal::LoadPerCore => "1-minute load per CPU",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Signal::MemoryAvailableMb => " MB",
            Signal::LoadPerCore => "",
            _ => "%",
        }
    }

    pub fn threshold(self, signals: &Signals) -> Option<Threshold> {
        match self {
            Signal::CpuPressure => signals.cpu_pressure,
            Signal::IoPressure => signals.io_pressure,
            Signal::IoStall => signals.io_stall,
            Signal::MemoryPressure => signals.memory_pressure,
            Signal::MemoryStall => signals.memory_stall,
            Signal::Iowait => signals.iowait,
            Signal::MemoryAvailableMb => signals.memory_available_mb,
            Signal::LoadPerCore => signals.load_per_core,
        }
    }

    /// The signal's value in these readings; None where it does not apply (no PSI, say, or the
    /// load average while PSI is there).
    pub fn value(self, r: &HostReadings) -> Option<f64> {
        let psi = r.pressure.as_ref();
        match self {
            Signal::CpuPressure => psi.map(|p| p.cpu.some_avg10),
            Signal::IoPressure => psi.map(|p| p.io.some_avg10),
            Signal::IoStall => psi.and_then(|p| p.io.full_avg10),
            Signal::MemoryPressure => psi.map(|p| p.memory.some_avg10),
            Signal::MemoryStall => psi.and_then(|p| p.memory.full_avg10),
            Signal::Iowait => r.iowait_percent,
            Signal::MemoryAvailableMb => {
                (r.memory.total_bytes > 0).then(|| r.memory_available_mb())
            }
            Signal::LoadPerCore => match psi {
                Some(_) => None,
                None => r.load_per_core(),
            },
        }
    }
}

/// One signal as the status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalState {
    pub signal: Signal,
    pub reason: Throttle,
    pub value: Option<f64>,
    pub trip: f64,
    pub clear: f64,
    pub tripped: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    tripped: [bool; 8],
    values: [Option<f64>; 8],
    pub boot_cap: BootCap,
}

/// A hysteresis step: trips at `trip`, clears once back past `clear`, holds in between.
pub fn hysteresis(threshold: &Threshold, value: f64, tripped: bool) -> bool {
    if threshold.trips_below() {
        if value <= threshold.trip {
            true
        } else if value >= threshold.clear {
            false
        } else {
            tripped
        }
    } else if value >= threshold.trip {
        true
    } else if value <= threshold.clear {
        false
    } else {
        tripped
    }
}

fn mb(bytes: u64) -> u64 {
    bytes / MIB
}

fn gb_text(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / GIB as f64)
}

impl Policy {
    pub fn new(tuning: &GovernorTuning) -> Policy {
        Policy {
            tripped: [false; 8],
            values: [None; 8],
            boot_cap: BootCap::new(&tuning.boot_cap),
        }
    }

    /// Moves every signal's hysteresis with a new sample. Call once per sample. Returns true when
    /// a signal tripped or cleared.
    pub fn observe(&mut self, tuning: &GovernorTuning, readings: &HostReadings) -> bool {
        let mut changed = false;
        self.boot_cap.clamp(&tuning.boot_cap);
        for signal in Signal::ALL {
            let i = signal.index();
            let value = signal.value(readings);
            self.values[i] = value;
            let now = match (signal.threshold(&tuning.signals), value) {
                (Some(threshold), Some(value)) => hysteresis(&threshold, value, self.tripped[i]),
                _ => false,
            };
            changed |= now != self.tripped[i];
            self.tripped[i] = now;
        }
        changed
    }

    pub fn is_tripped(&self, signal: Signal) -> bool {
        self.tripped[signal.index()]
    }

    pub fn signals(&self, tuning: &GovernorTuning) -> Vec<SignalState> {
        Signal::ALL
            .iter()
            .filter_map(|s| {
                let threshold = s.threshold(&tuning.signals)?;
                Some(SignalState {
                    signal: *s,
                    reason: s.reason(),
                    value: self.values[s.index()],
                    trip: threshold.trip,
                    clear: threshold.clear,
                    tripped: self.tripped[s.index()],
                })
            })
            .collect()
    }

    pub fn boot_limit(&self, tuning: &GovernorTuning) -> u32 {
        self.boot_cap.limit(&tuning.boot_cap)
    }

    pub fn record_boot(
        &mut self,
        tuning: &GovernorTuning,
        outcome: &BootOutcome,
        now: Duration,
    ) -> CapChange {
        self.boot_cap.record(&tuning.boot_cap, outcome, now)
    }

    /// May one more sandbox asking for `demand` start now?
    pub fn decide(
        &self,
        tuning: &GovernorTuning,
        readings: &HostReadings,
        committed: &Committed,
        demand: &Demand,
    ) -> Decision {
        let mut blocks = match static_blocks(tuning, readings, committed, demand) {
            Ok(blocks) => blocks,
            Err(never) => return Decision::Never(never),
        };
        blocks.extend(self.boot_cap_block(tuning, committed));
        blocks.extend(self.dynamic_blocks(tuning, committed));
        if blocks.is_empty() {
            Decision::Admit
        } else {
            Decision::Wait(blocks)
        }
    }

    /// The boot cap's block, when as many sandboxes boot as it allows.
    fn boot_cap_block(&self, tuning: &GovernorTuning, committed: &Committed) -> Option<Block> {
        let limit = self.boot_limit(tuning);
        (committed.booting >= limit).then(|| Block {
            reason: Throttle::BootCap,
            detail: format!(
                "{} sandboxes booting; the boot cap is {limit} (cap {:.2})",
                committed.booting,
                self.boot_cap.value()
            ),
        })
    }

    /// The tripped dynamic signals, once the progress floor is met. These alone hold a job that
    /// takes a sandbox already booted (the pool's): it needs no budget or boot of its own, but
    /// its command loads the host like any other.
    pub fn dynamic_blocks(&self, tuning: &GovernorTuning, committed: &Committed) -> Vec<Block> {
        let mut blocks = Vec::new();
        if committed.sandboxes < tuning.progress_floor {
            return blocks;
        }
        for signal in Signal::ALL {
            if !self.tripped[signal.index()] {
                continue;
            }
            let Some(threshold) = signal.threshold(&tuning.signals) else {
                continue;
            };
            let value = self.values[signal.index()].unwrap_or(f64::NAN);
            let unit = signal.unit();
            let (op, clear_op) = if threshold.trips_below() {
                ("≤", "≥")
            } else {
                ("≥", "≤")
            };
            blocks.push(Block {
                reason: signal.reason(),
                detail: format!(
                    "{} {value:.1}{unit} (tripped at {op} {}{unit}, clears at {clear_op} {}{unit})",
                    signal.describe(),
                    threshold.trip,
                    threshold.clear
                ),
            });
        }
        blocks
    }
}

/// The static budget's blocks for one more sandbox of `demand` (memory, vCPUs, disk), or
/// Err with the rule it can never meet on this host.
pub fn static_blocks(
    tuning: &GovernorTuning,
    readings: &HostReadings,
    committed: &Committed,
    demand: &Demand,
) -> Result<Vec<Block>, Block> {
    let budgets = Budgets::of(tuning, readings);
    let mut blocks = Vec::new();

    // Static: memory.
    let need_mb = demand.memory_mb + budgets.sandbox_overhead_mb;
    let reserve = tuning.budget.memory_reserve_mb;
    if need_mb > budgets.memory_mb {
        return Err(Block {
            reason: Throttle::Memory,
            detail: format!(
                "needs {need_mb} MB with overhead; this host allows {} MB for sandboxes \
                 ({} MB physical − {reserve} MB reserve)",
                budgets.memory_mb,
                mb(readings.memory.total_bytes)
            ),
        });
    }
    let used_mb = budgets.memory_used_mb(committed);
    if used_mb + need_mb > budgets.memory_mb {
        blocks.push(Block {
            reason: Throttle::Memory,
            detail: format!(
                "memory budget: {used_mb} MB committed + {need_mb} MB > {} MB \
                 (physical − {reserve} MB reserve)",
                budgets.memory_mb
            ),
        });
    }

    // Static: vCPUs.
    let per_core = tuning.budget.vcpus_per_core;
    if u64::from(demand.vcpus) > budgets.vcpus {
        return Err(Block {
            reason: Throttle::Cpu,
            detail: format!(
                "needs {} vCPUs; this host allows {} ({} cores × {per_core})",
                demand.vcpus,
                budgets.vcpus,
                readings.cores()
            ),
        });
    }
    if committed.vcpus + u64::from(demand.vcpus) > budgets.vcpus {
        blocks.push(Block {
            reason: Throttle::Cpu,
            detail: format!(
                "vCPU budget: {} committed + {} > {} ({} cores × {per_core})",
                committed.vcpus,
                demand.vcpus,
                budgets.vcpus,
                readings.cores()
            ),
        });
    }

    // Static: disk.
    if let Some(block) = disk_block(tuning, &budgets, committed, demand) {
        if committed.sandboxes == 0 {
            // Nothing of ours holds space we could wait for: it would wait forever.
            return Err(Block {
                reason: Throttle::Disk,
                detail: format!("with no sandbox running, {}", block.detail),
            });
        }
        blocks.push(block);
    }

    Ok(blocks)
}

/// The disk rule: the storage keeps `disk_min_free_percent` free after the new sandbox. On thick
/// storage a disk takes its virtual size when it is cloned, so the new disk and those of
/// sandboxes still booting (not cloned yet, or just) are set aside in full; the rest are already
/// out of the free space. On thin storage a disk takes what the guest writes: every live sandbox
/// keeps what is left of its growth reserve (`sandbox_disk_growth_mb`, at most its virtual size)
/// beyond what it already takes, and the new one needs its reserve plus the overhead.
fn disk_block(
    tuning: &GovernorTuning,
    budgets: &Budgets,
    committed: &Committed,
    demand: &Demand,
) -> Option<Block> {
    let (Some(available), Some(keep)) =
        (budgets.disk_available_bytes, budgets.disk_keep_free_bytes)
    else {
        return None;
    };
    let b = &tuning.budget;
    let overhead = b.sandbox_disk_overhead_mb.saturating_mul(MIB);
    let (reserved, need, reserved_text, need_text) = match committed.provisioning {
        Provisioning::Thick => {
            let reserved = committed.booting_disk_gb.saturating_mul(GIB);
            let need = demand.disk_gb.saturating_mul(GIB).saturating_add(overhead);
            (
                reserved,
                need,
                format!("{} for booting sandboxes", gb_text(reserved)),
                format!("{} for this one", gb_text(need)),
            )
        }
        Provisioning::Thin => {
            let growth = b.sandbox_disk_growth_mb.saturating_mul(MIB);
            let reserve_of = |virtual_gb: u64| growth.min(virtual_gb.saturating_mul(GIB));
            let reserved = committed
                .disks
                .iter()
                .map(|d| reserve_of(d.virtual_gb).saturating_sub(d.allocated_bytes.unwrap_or(0)))
                .fold(0u64, u64::saturating_add);
            let need = reserve_of(demand.disk_gb).saturating_add(overhead);
            (
                reserved,
                need,
                format!(
                    "{} growth reserve left to {} live sandboxes",
                    gb_text(reserved),
                    committed.disks.len()
                ),
                format!(
                    "{} for this one (thin: {} growth reserve + {} overhead)",
                    gb_text(need),
                    gb_text(reserve_of(demand.disk_gb)),
                    gb_text(overhead)
                ),
            )
        }
    };
    let left = available.saturating_sub(reserved);
    if left >= need.saturating_add(keep) {
        return None;
    }
    Some(Block {
        reason: Throttle::Disk,
        detail: format!(
            "storage: {} free − {reserved_text} − {need_text} leaves {}, under the {}% ({}) to \
             keep free",
            gb_text(available),
            gb_text(left.saturating_sub(need)),
            b.disk_min_free_percent.unwrap_or(0.0),
            gb_text(keep)
        ),
    })
}

/// Whether a queued job's deadline predictably passes before it starts: at `position` (1 = next)
/// with `rate` admissions per second, it waits about `position / rate` seconds. It is doomed when
/// that is at least `margin` times the `left_seconds` it has. Returns the predicted wait then.
pub fn doomed(position: u64, left_seconds: f64, rate: f64, margin: f64) -> Option<f64> {
    if rate.is_nan() || rate <= 0.0 || position == 0 {
        return None;
    }
    let wait = position as f64 / rate;
    (wait >= margin * left_seconds.max(0.0)).then_some(wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::governor::{BootCapTuning, Budget};
    use crate::governor::readings::{CpuReadings, DiskReadings, MemoryReadings, Pressure, Stall};

    const GB: u64 = GIB;

    /// An 8-core, 32 GiB host with 500 GB of storage and no pressure.
    fn calm() -> HostReadings {
        HostReadings {
            cpu: CpuReadings {
                physical_cores: 8,
                logical_cpus: 16,
                usage_percent: 10.0,
                per_core_percent: vec![10.0; 16],
                ..CpuReadings::default()
            },
            memory: MemoryReadings {
                total_bytes: 32 * GB,
                available_bytes: 28 * GB,
                swap_total_bytes: 0,
                swap_used_bytes: 0,
            },
            iowait_percent: Some(1.0),
            pressure: Some(Pressure::default()),
            disk: Some(DiskReadings {
                path: "/var/lib/agentlab".into(),
                total_bytes: 500 * GB,
                available_bytes: 400 * GB,
            }),
            notes: Vec::new(),
        }
    }

    fn tuning() -> GovernorTuning {
        GovernorTuning {
            boot_cap: BootCapTuning {
                initial: 4.0,
                max: 8,
                ..BootCapTuning::default()
            },
            ..GovernorTuning::default()
        }
    }

    /// The performance document's balanced / yolo-ephemeral profile.
    fn balanced() -> Demand {
        Demand {
            vcpus: 4,
            memory_mb: 6144,
            disk_gb: 30,
        }
    }

    fn holding(n: u32, booting: u32) -> Committed {
        let mut c = Committed::default();
        for i in 0..n {
            c.add(&balanced(), i < booting);
        }
        c
    }

    fn reasons(decision: &Decision) -> Vec<Throttle> {
        match decision {
            Decision::Wait(blocks) => blocks.iter().map(|b| b.reason).collect(),
            Decision::Never(block) => vec![block.reason],
            Decision::Admit => Vec::new(),
        }
    }

    fn decide(t: &GovernorTuning, r: &HostReadings, c: &Committed) -> Decision {
        let mut policy = Policy::new(t);
        policy.observe(t, r);
        policy.decide(t, r, c, &balanced())
    }

    #[test]
    fn a_calm_host_admits_up_to_the_document_s_concurrency() {
        let t = tuning();
        let r = calm();
        // 8 cores × 2 = 16 vCPUs and 32 GB − 4 GB: four 6 GB, 4-vCPU sandboxes, as the sizing
        // table says for 32 GB. Both rules hold the fifth.
        assert_eq!(decide(&t, &r, &holding(3, 0)), Decision::Admit);
        assert_eq!(
            reasons(&decide(&t, &r, &holding(4, 0))),
            vec![Throttle::Memory, Throttle::Cpu]
        );
    }

    #[test]
    fn the_memory_rule_keeps_the_reserve_and_counts_overhead() {
        let t = GovernorTuning {
            budget: Budget {
                vcpus_per_core: 100.0,
                ..Budget::default()
            },
            ..tuning()
        };
        let r = calm();
        // 32768 − 4096 = 28672 MB; each sandbox holds 6144 + 200.
        assert_eq!(decide(&t, &r, &holding(3, 0)), Decision::Admit);
        let d = decide(&t, &r, &holding(4, 0));
        assert_eq!(reasons(&d), vec![Throttle::Memory]);
        let Decision::Wait(blocks) = d else {
            unreachable!()
        };
        assert!(
            blocks[0].detail.contains("25376 MB committed"),
            "{}",
            blocks[0].detail
        );
        // A smaller sandbox still fits beside the four.
        let mut policy = Policy::new(&t);
        policy.observe(&t, &r);
        let small = Demand {
            vcpus: 1,
            memory_mb: 2900,
            disk_gb: 10,
        };
        assert_eq!(
            policy.decide(&t, &r, &holding(4, 0), &small),
            Decision::Admit
        );
    }

    #[test]
    fn a_job_that_can_never_fit_is_told_so() {
        let t = tuning();
        let mut r = calm();
        r.memory.total_bytes = 8 * GB;
        let d = decide(&t, &r, &Committed::default());
        let Decision::Never(block) = d else {
            panic!("{d:?}")
        };
        assert_eq!(block.reason, Throttle::Memory);
        assert!(block.detail.contains("4096 MB reserve"), "{}", block.detail);
        let mut r = calm();
        r.cpu.physical_cores = 1;
        let d = decide(&t, &r, &Committed::default());
        assert!(
            matches!(
                d,
                Decision::Never(Block {
                    reason: Throttle::Cpu,
                    ..
                })
            ),
            "{d:?}"
        );
    }

    #[test]
    fn the_disk_rule_keeps_twenty_percent_free_after_the_new_disk() {
        let t = tuning();
        let mut r = calm();
        // 500 GB total: 100 GB must stay free. 131 GB free − 30.5 leaves 100.5: fits.
        r.disk.as_mut().unwrap().available_bytes = 131 * GB;
        assert_eq!(decide(&t, &r, &Committed::default()), Decision::Admit);
        // A sandbox still booting has its 30 GB reserved: no longer fits.
        let d = decide(&t, &r, &holding(1, 1));
        assert_eq!(reasons(&d), vec![Throttle::Disk]);
        r.disk.as_mut().unwrap().available_bytes = 125 * GB;
        assert!(
            matches!(
                decide(&t, &r, &Committed::default()),
                Decision::Never(Block {
                    reason: Throttle::Disk,
                    ..
                })
            ),
            "nothing of ours to wait for"
        );
        // Turned off, or without a storage reading, the rule does not apply.
        let off = GovernorTuning {
            budget: Budget {
                disk_min_free_percent: None,
                ..Budget::default()
            },
            ..tuning()
        };
        assert_eq!(decide(&off, &r, &Committed::default()), Decision::Admit);
        r.disk = None;
        assert_eq!(decide(&t, &r, &Committed::default()), Decision::Admit);
    }

    /// The host: 74 GB free of 252 GB (the keep-free 20% is 50.4 GB).
    fn demo_host() -> HostReadings {
        let mut r = calm();
        let disk = r.disk.as_mut().unwrap();
        disk.total_bytes = 252 * GB;
        disk.available_bytes = 74 * GB;
        r
    }

    /// `n` live balanced sandboxes on thin storage, each disk taking `allocated` bytes
    /// (None: not measured yet).
    fn thin(n: u32, allocated: Option<u64>) -> Committed {
        let mut c = Committed::default();
        let mut usage = DiskUsage {
            provisioning: Provisioning::Thin,
            ..DiskUsage::default()
        };
        for i in 0..n {
            let vm = format!("sandbox-{i}");
            c.add_named(&balanced(), false, vm.clone());
            if let Some(bytes) = allocated {
                usage.allocated.insert(vm, bytes);
            }
        }
        c.measured(&usage);
        c
    }

    fn roomy() -> GovernorTuning {
        // Memory and vCPUs out of the way: only the disk rule speaks.
        GovernorTuning {
            budget: Budget {
                vcpus_per_core: 100.0,
                memory_reserve_mb: 0,
                sandbox_overhead_mb: 0,
                ..Budget::default()
            },
            ..tuning()
        }
    }

    fn big_memory(mut r: HostReadings) -> HostReadings {
        r.memory.total_bytes = 1024 * GB;
        r.memory.available_bytes = 1000 * GB;
        r
    }

    #[test]
    fn a_thin_disk_counts_its_growth_reserve_not_its_virtual_size() {
        let t = tuning();
        let r = demo_host();
        // Thick: 74 − 30.5 leaves 43.5 GB, under the 50.4 to keep; nothing runs, so never.
        let d = decide(&t, &r, &Committed::default());
        let Decision::Never(block) = d else {
            panic!("{d:?}")
        };
        assert_eq!(block.reason, Throttle::Disk);
        for number in ["74.0 GB free", "30.5 GB for this one", "43.5 GB", "50.4 GB"] {
            assert!(block.detail.contains(number), "{number}: {}", block.detail);
        }
        // Thin, as the local backend reports it: 74 − (4 + 0.5) leaves 69.5 GB. Admitted.
        assert_eq!(decide(&t, &r, &thin(0, None)), Decision::Admit);
    }

    #[test]
    fn each_live_thin_disk_keeps_what_is_left_of_its_reserve() {
        let t = roomy();
        let r = big_memory(demo_host());
        // 23.6 GB above the keep-free line; the new one needs 4.5.
        // Unmeasured disks hold their whole 4 GB reserve: 4 × 4 + 4.5 fits, 5 × 4 + 4.5 does not.
        assert_eq!(decide(&t, &r, &thin(4, None)), Decision::Admit);
        let d = decide(&t, &r, &thin(5, None));
        assert_eq!(reasons(&d), vec![Throttle::Disk]);
        let Decision::Wait(blocks) = d else {
            unreachable!()
        };
        assert!(
            blocks[0]
                .detail
                .contains("20.0 GB growth reserve left to 5 live sandboxes"),
            "{}",
            blocks[0].detail
        );
        // Disks that took 1 GB each hold 3 GB more: 6 × 3 + 4.5 fits, 7 × 3 + 4.5 does not.
        assert_eq!(decide(&t, &r, &thin(6, Some(GB))), Decision::Admit);
        assert_eq!(
            reasons(&decide(&t, &r, &thin(7, Some(GB)))),
            vec![Throttle::Disk]
        );
        // Disks past their reserve hold nothing more (what they took is out of the free space).
        assert_eq!(decide(&t, &r, &thin(20, Some(9 * GB))), Decision::Admit);
        // A reserve is never more than the disk's virtual size.
        let mut small = Committed::default();
        for i in 0..20 {
            let disk = Demand {
                disk_gb: 1,
                ..balanced()
            };
            small.add_named(&disk, false, format!("sandbox-{i}"));
        }
        small.measured(&DiskUsage {
            provisioning: Provisioning::Thin,
            ..DiskUsage::default()
        });
        // 20 × 1 GB + 4.5 = 24.5 > 23.6: waits; 19 would fit.
        assert_eq!(reasons(&decide(&t, &r, &small)), vec![Throttle::Disk]);
        small.disks.pop();
        small.sandboxes -= 1;
        assert_eq!(decide(&t, &r, &small), Decision::Admit);
    }

    #[test]
    fn thick_storage_keeps_counting_virtual_sizes() {
        let t = roomy();
        let mut r = big_memory(calm());
        // 500 GB total, 100 to keep; 161 free: one booting 30 GB disk plus the new 30.5 fit.
        r.disk.as_mut().unwrap().available_bytes = 161 * GB;
        let mut booting = Committed::default();
        booting.add_named(&balanced(), true, "sandbox-a".into());
        // A measurement from a thick backend changes nothing.
        booting.measured(&DiskUsage {
            provisioning: Provisioning::Thick,
            allocated: [("sandbox-a".to_owned(), GB)].into(),
        });
        assert_eq!(decide(&t, &r, &booting), Decision::Admit);
        booting.add_named(&balanced(), true, "sandbox-b".into());
        assert_eq!(reasons(&decide(&t, &r, &booting)), vec![Throttle::Disk]);
    }

    #[test]
    fn a_disk_too_full_for_even_one_thin_sandbox_on_an_idle_host_is_never() {
        let t = roomy();
        let mut r = big_memory(demo_host());
        r.disk.as_mut().unwrap().available_bytes = 54 * GB; // 3.6 GB above the line, 4.5 needed
        let d = decide(&t, &r, &thin(0, None));
        let Decision::Never(block) = d else {
            panic!("{d:?}")
        };
        assert_eq!(block.reason, Throttle::Disk);
        assert!(
            block
                .detail
                .starts_with("with no sandbox running, storage: 54.0 GB free"),
            "{}",
            block.detail
        );
        assert!(
            block.detail.contains("4.5 GB for this one"),
            "{}",
            block.detail
        );
        // With a sandbox of ours running, its end may free space: wait.
        assert_eq!(
            reasons(&decide(&t, &r, &thin(1, None))),
            vec![Throttle::Disk]
        );
        assert!(matches!(decide(&t, &r, &thin(1, None)), Decision::Wait(_)));
    }

    #[test]
    fn the_boot_cap_holds_boots_beyond_it() {
        let t = GovernorTuning {
            boot_cap: BootCapTuning {
                initial: 2.0,
                ..BootCapTuning::default()
            },
            ..tuning()
        };
        let r = calm();
        assert_eq!(decide(&t, &r, &holding(3, 1)), Decision::Admit);
        assert_eq!(
            reasons(&decide(&t, &r, &holding(3, 2))),
            vec![Throttle::BootCap]
        );
    }

    fn pressured(cpu: f64, io: f64, memory: f64) -> HostReadings {
        let mut r = calm();
        r.pressure = Some(Pressure {
            cpu: Stall {
                some_avg10: cpu,
                full_avg10: Some(0.0),
            },
            io: Stall {
                some_avg10: io,
                full_avg10: Some(0.0),
            },
            memory: Stall {
                some_avg10: memory,
                full_avg10: Some(0.0),
            },
        });
        r
    }

    #[test]
    fn each_pressure_signal_throttles_for_its_reason() {
        let t = tuning();
        let c = holding(1, 0);
        assert_eq!(
            reasons(&decide(&t, &pressured(70.0, 0.0, 0.0), &c)),
            vec![Throttle::Cpu]
        );
        assert_eq!(
            reasons(&decide(&t, &pressured(0.0, 45.0, 0.0), &c)),
            vec![Throttle::Io]
        );
        assert_eq!(
            reasons(&decide(&t, &pressured(0.0, 0.0, 25.0), &c)),
            vec![Throttle::Memory]
        );
        let mut r = calm();
        r.iowait_percent = Some(35.0);
        assert_eq!(reasons(&decide(&t, &r, &c)), vec![Throttle::Io]);
        let mut r = calm();
        r.memory.available_bytes = GB;
        assert_eq!(reasons(&decide(&t, &r, &c)), vec![Throttle::Memory]);
        let mut r = pressured(0.0, 0.0, 0.0);
        r.pressure.as_mut().unwrap().io.full_avg10 = Some(25.0);
        r.pressure.as_mut().unwrap().memory.full_avg10 = Some(6.0);
        assert_eq!(
            reasons(&decide(&t, &r, &c)),
            vec![Throttle::Io, Throttle::Memory]
        );
    }

    #[test]
    fn below_the_progress_floor_pressure_does_not_hold_the_queue() {
        let t = tuning();
        let r = pressured(95.0, 90.0, 50.0);
        assert_eq!(decide(&t, &r, &Committed::default()), Decision::Admit);
        assert_eq!(reasons(&decide(&t, &r, &holding(1, 0))).len(), 3);
    }

    #[test]
    fn without_psi_the_load_average_stands_in_for_cpu() {
        let t = tuning();
        let mut r = calm();
        r.pressure = None;
        r.cpu.load_average.one = 40.0; // 16 logical CPUs: 2.5 per CPU
        assert_eq!(
            reasons(&decide(&t, &r, &holding(1, 0))),
            vec![Throttle::Cpu]
        );
        // With PSI present, the load average is not a signal.
        r.pressure = Some(Pressure::default());
        assert_eq!(decide(&t, &r, &holding(1, 0)), Decision::Admit);
    }

    #[test]
    fn hysteresis_does_not_flap_around_a_threshold() {
        let t = tuning(); // cpu_pressure trips at 60, clears at 30
        let c = holding(1, 0);
        let mut policy = Policy::new(&t);
        let mut admitted = Vec::new();
        let trace = [
            50.0, 59.9, 60.0, 59.0, 45.0, 61.0, 31.0, 30.0, 45.0, 59.0, 60.5,
        ];
        for cpu in trace {
            let r = pressured(cpu, 0.0, 0.0);
            policy.observe(&t, &r);
            admitted.push(policy.decide(&t, &r, &c, &balanced()) == Decision::Admit);
        }
        assert_eq!(
            admitted,
            [true, true, false, false, false, false, false, true, true, true, false],
            "trips at 60, stays tripped until 30, stays clear until 60 again"
        );
        // Available memory trips below 2048 MB and clears above 4096 MB.
        let mut policy = Policy::new(&t);
        let mut tripped = Vec::new();
        for mb in [5000, 2100, 2048, 3000, 4000, 4096, 3000] {
            let mut r = calm();
            r.memory.available_bytes = mb * MIB;
            policy.observe(&t, &r);
            tripped.push(policy.is_tripped(Signal::MemoryAvailableMb));
        }
        assert_eq!(tripped, [false, false, true, true, true, false, false]);
    }

    #[test]
    fn observe_reports_changes_only() {
        let t = tuning();
        let mut policy = Policy::new(&t);
        assert!(!policy.observe(&t, &calm()));
        assert!(policy.observe(&t, &pressured(70.0, 0.0, 0.0)));
        assert!(!policy.observe(&t, &pressured(50.0, 0.0, 0.0)));
        assert!(policy.observe(&t, &pressured(10.0, 0.0, 0.0)));
    }

    #[test]
    fn a_turned_off_signal_never_trips() {
        let mut t = tuning();
        t.signals.cpu_pressure = None;
        assert_eq!(
            decide(&t, &pressured(99.0, 0.0, 0.0), &holding(1, 0)),
            Decision::Admit
        );
    }

    #[test]
    fn a_deadline_is_doomed_only_when_the_predicted_wait_is_well_past_it() {
        // Position 10, one admission every 10 s: about 100 s of wait.
        assert_eq!(doomed(10, 30.0, 0.1, 1.5), Some(100.0));
        assert_eq!(doomed(10, 70.0, 0.1, 1.5), None);
        assert_eq!(doomed(10, 30.0, 0.0, 1.5), None, "no rate, no prediction");
    }
}
