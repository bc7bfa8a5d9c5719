//! What `GET /v1/governor` answers and `agentlab status` prints: the readings, the signals with
//! their hysteresis state, the static budget against what is committed, the boot cap, why the
//! queue's head waits, and what sampling costs.

use serde::{Deserialize, Serialize};

use super::boot_cap::BootVerdict;
use super::policy::{Block, Budgets, Committed, SignalState};
use super::readings::HostReadings;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GovernorStatus {
    /// False with `governor: off`: readings are taken, admission ignores them.
    pub enabled: bool,
    pub sample_interval_ms: u64,
    /// When the readings were taken (ms since the epoch); None before the first sample.
    pub sampled_at_ms: Option<i64>,
    pub readings: Option<HostReadings>,
    /// `psi`, or the fallback in use and why.
    pub pressure_source: String,
    pub signals: Vec<SignalState>,
    pub budgets: Option<Budgets>,
    pub committed: Committed,
    pub boot_cap: BootCapStatus,
    pub queue: QueueStatus,
    pub cost: SampleCost,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BootCapStatus {
    /// The cap as a real number; `limit` is what applies.
    pub cap: f64,
    pub limit: u32,
    pub booting: u32,
    pub min: u32,
    pub max: u32,
    /// The fastest recent boot.
    pub baseline_seconds: Option<f64>,
    /// Boots slower than this count as slow.
    pub on_time_seconds: f64,
    pub on_time: u64,
    pub slow: u64,
    pub timeouts: u64,
    pub last: Option<BootVerdict>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueStatus {
    pub length: u64,
    /// The job at the queue's head, while one waits.
    pub head: Option<String>,
    pub waiting: Option<Waiting>,
    /// Jobs the governor let through since the daemon started.
    pub admitted_total: u64,
    /// Recent admissions per minute while jobs were waiting; what deadline predictions use.
    pub admissions_per_minute: Option<f64>,
}

/// Why the head of the queue waits: one of the policy's reasons (`cpu`, `memory`, `io`, `disk`,
/// `boot_cap`), or `max_concurrent` (the tuning's hard ceiling) or `warming_up` (no sample yet).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Waiting {
    pub reason: String,
    pub detail: String,
    /// Every rule holding it back, the first one first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<Block>,
    /// Since when this job has been the waiting head (ms since the epoch).
    pub since_ms: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SampleCost {
    pub samples: u64,
    /// CPU time of the last sample (the sampling thread's own), ms.
    pub last_cpu_ms: f64,
    pub mean_cpu_ms: f64,
    /// Wall time of the last sample, ms.
    pub last_wall_ms: f64,
}
