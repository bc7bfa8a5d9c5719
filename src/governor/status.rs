//! What `GET /v1/governor` answers and `agentlab status` prints: the readings, the signals with
//! their hysteresis state, the static budget against what is committed, the memory committed to
//! live sandboxes next to what they really hold, the boot cap, why the queue's head waits, and
//! what sampling costs; and, for one queued job, its place in the queue
//! and what it waits for (`GET /v1/jobs/{id}`, `agentlab job run --follow`).

use std::collections::HashMap;

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
    /// Memory committed to live sandboxes next to what they really hold. The routes fill it in
    /// from the backend's measurement; None where nobody measured (the actor's own view).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStatus>,
}

/// What live sandboxes are committed in memory, as the budget counts it (`committed.memory_mb`),
/// next to what they really hold on the host. Sandboxes restored from one template snapshot share
/// its pages until they write them, so their PSS can be far below what they were committed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryStatus {
    /// Sum of the live sandboxes' memory_mb (and admitted jobs' not holding one yet).
    pub committed_mb: u64,
    /// Sum of the measured sandboxes' PSS; None when the backend measured none of them.
    pub pss_bytes: Option<u64>,
    /// Sum of their RSS (shared pages counted in full for each).
    pub rss_bytes: Option<u64>,
    /// How many of the sandboxes below were measured.
    pub measured: u32,
    /// Why the backend's measurement failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub sandboxes: Vec<SandboxMemory>,
}

/// One live sandbox's committed memory and, when measured, what it really holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxMemory {
    pub vm: String,
    /// In its boot phases (or admitted and not cloning yet), when it holds less than it will.
    #[serde(default)]
    pub booting: bool,
    pub committed_mb: u64,
    pub pss_bytes: Option<u64>,
    pub rss_bytes: Option<u64>,
}

impl MemoryStatus {
    /// Sets each sandbox's committed memory (`(vm, booting, memory_mb)`, in order) against the
    /// backend's measurement; a measurement of a VM not among them (another daemon's) is left out.
    pub fn of(
        committed: impl IntoIterator<Item = (String, bool, u64)>,
        measured: Result<&crate::backend::MemoryUsage, String>,
    ) -> MemoryStatus {
        let empty = HashMap::new();
        let (by_vm, error) = match measured {
            Ok(usage) => (&usage.by_vm, None),
            Err(error) => (&empty, Some(error)),
        };
        let sandboxes: Vec<SandboxMemory> = committed
            .into_iter()
            .map(|(vm, booting, committed_mb)| {
                let used = by_vm.get(&vm);
                SandboxMemory {
                    booting,
                    committed_mb,
                    pss_bytes: used.map(|m| m.pss_bytes),
                    rss_bytes: used.map(|m| m.rss_bytes),
                    vm,
                }
            })
            .collect();
        let measured: Vec<&SandboxMemory> =
            sandboxes.iter().filter(|s| s.pss_bytes.is_some()).collect();
        let sum = |field: fn(&SandboxMemory) -> Option<u64>| {
            (!measured.is_empty()).then(|| measured.iter().filter_map(|s| field(s)).sum())
        };
        MemoryStatus {
            committed_mb: sandboxes.iter().map(|s| s.committed_mb).sum(),
            pss_bytes: sum(|s| s.pss_bytes),
            rss_bytes: sum(|s| s.rss_bytes),
            measured: u32::try_from(measured.len()).unwrap_or(u32::MAX),
            error,
            sandboxes,
        }
    }
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

/// The queue's head and why it waits, as the governor last decided.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeadWait {
    pub head: Option<String>,
    pub waiting: Option<Waiting>,
}

/// A queued job's place in the queue and what it waits for: the `queue` of `GET /v1/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobQueue {
    /// 1 = next.
    pub position: u64,
    /// At the head, the governor's reason (see [`Waiting`]); `queue` behind other jobs;
    /// `admission` at the head before the governor has looked at it.
    pub reason: String,
    /// The same in words, with the rule and its numbers.
    pub waiting_for: String,
    /// Since when the head has waited (ms since the epoch); None behind the head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<i64>,
}

impl HeadWait {
    /// What job `job_id`, at `position` in the queue, waits for.
    pub fn for_job(&self, job_id: &str, position: u64) -> JobQueue {
        let waiting = self.waiting.as_ref();
        if let Some(w) = waiting.filter(|_| self.head.as_deref() == Some(job_id)) {
            return JobQueue {
                position,
                reason: w.reason.clone(),
                waiting_for: format!("{}: {}", w.reason, w.detail),
                since_ms: Some(w.since_ms),
            };
        }
        if position > 1 {
            let ahead = position - 1;
            let jobs = if ahead == 1 { "job" } else { "jobs" };
            let first = waiting.map_or_else(String::new, |w| {
                format!("; the first waits for {}", w.reason)
            });
            return JobQueue {
                position,
                reason: "queue".to_owned(),
                waiting_for: format!("{ahead} {jobs} ahead{first}"),
                since_ms: None,
            };
        }
        JobQueue {
            position,
            reason: "admission".to_owned(),
            waiting_for: "next to start, at the next admission round".to_owned(),
            since_ms: None,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{MemoryUsage, VmMemory};

    #[test]
    fn memory_sets_what_each_sandbox_was_committed_against_what_it_holds() {
        const MIB: u64 = 1 << 20;
        let usage = MemoryUsage {
            by_vm: HashMap::from([
                (
                    "sandbox-a".to_owned(),
                    VmMemory {
                        pss_bytes: 300 * MIB,
                        rss_bytes: 900 * MIB,
                    },
                ),
                (
                    "sandbox-b".to_owned(),
                    VmMemory {
                        pss_bytes: 200 * MIB,
                        rss_bytes: 850 * MIB,
                    },
                ),
                // Another daemon's VM on this host: not ours to sum.
                (
                    "sandbox-x".to_owned(),
                    VmMemory {
                        pss_bytes: 999 * MIB,
                        rss_bytes: 999 * MIB,
                    },
                ),
            ]),
        };
        let committed = [
            ("sandbox-a".to_owned(), false, 1024),
            ("sandbox-b".to_owned(), false, 1024),
            // Admitted, no VM yet.
            ("sandbox-c".to_owned(), true, 2048),
        ];
        let memory = MemoryStatus::of(committed.clone(), Ok(&usage));
        assert_eq!(memory.committed_mb, 4096);
        assert_eq!(memory.pss_bytes, Some(500 * MIB));
        assert_eq!(memory.rss_bytes, Some(1750 * MIB));
        assert_eq!(memory.measured, 2);
        assert_eq!(memory.error, None);
        assert_eq!(
            memory.sandboxes[2],
            SandboxMemory {
                vm: "sandbox-c".into(),
                booting: true,
                committed_mb: 2048,
                pss_bytes: None,
                rss_bytes: None,
            }
        );
        assert_eq!(memory.sandboxes[0].pss_bytes, Some(300 * MIB));

        // Nothing measured: the committed figure stands alone, and a failure says why.
        let none = MemoryStatus::of(committed.clone(), Ok(&MemoryUsage::default()));
        assert_eq!(
            (none.committed_mb, none.pss_bytes, none.measured),
            (4096, None, 0)
        );
        let failed = MemoryStatus::of(committed, Err("boom".into()));
        assert_eq!(
            (failed.pss_bytes, failed.error.as_deref()),
            (None, Some("boom"))
        );
    }

    fn waiting_head() -> HeadWait {
        HeadWait {
            head: Some("a".into()),
            waiting: Some(Waiting {
                reason: "disk".into(),
                detail: "storage: 10.0 GB free".into(),
                blocks: Vec::new(),
                since_ms: 42,
            }),
        }
    }

    #[test]
    fn the_head_waits_for_the_governor_s_reason_and_the_rest_for_the_jobs_ahead() {
        let h = waiting_head();
        let head = h.for_job("a", 1);
        assert_eq!(
            (
                head.reason.as_str(),
                head.waiting_for.as_str(),
                head.since_ms
            ),
            ("disk", "disk: storage: 10.0 GB free", Some(42))
        );
        let third = h.for_job("c", 3);
        assert_eq!(third.reason, "queue");
        assert_eq!(third.waiting_for, "2 jobs ahead; the first waits for disk");
        assert_eq!(
            h.for_job("b", 2).waiting_for,
            "1 job ahead; the first waits for disk"
        );
        // Before the governor has looked at the new head.
        let fresh = HeadWait::default().for_job("a", 1);
        assert_eq!(fresh.reason, "admission");
        assert_eq!(
            HeadWait::default().for_job("b", 2).waiting_for,
            "1 job ahead"
        );
    }
}
