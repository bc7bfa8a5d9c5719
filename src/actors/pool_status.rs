//! What `GET /v1/pool` and `agentlab pool` show: per profile its target, how many sandboxes are
//! READY, booting and on their way out, the hits and misses since the daemon started, the oldest
//! READY sandbox's age and why its boots back off; then each pool sandbox with what it really
//! holds in host memory. Built from the store's rows, the tuning and the PoolBook.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::pool_book::PoolBook;
use crate::backend::VmMemory;
use crate::config::pool::PoolTuning;
use crate::model::{PoolSandbox, SandboxState};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub max_idle_seconds: u64,
    pub profiles: Vec<ProfilePool>,
    pub sandboxes: Vec<PoolSandboxView>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfilePool {
    pub profile: String,
    pub target: u32,
    pub ready: u32,
    pub booting: u32,
    pub destroying: u32,
    pub hits: u64,
    pub misses: u64,
    /// Seconds since the oldest READY sandbox became ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_age_seconds: Option<f64>,
    /// The last failed boot's error, while refills back off after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_until_ms: Option<i64>,
    /// Why the pool is short of its target and not being refilled now (the governor's rule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refill_waits: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSandboxView {
    #[serde(flatten)]
    pub sandbox: PoolSandbox,
    /// What its VM really holds (PSS), where the backend measured it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_pss_bytes: Option<u64>,
}

pub fn pool_status(
    rows: Vec<PoolSandbox>,
    pool: &PoolTuning,
    book: &PoolBook,
    memory: &HashMap<String, VmMemory>,
    now_ms: i64,
) -> PoolStatus {
    let mut profiles: BTreeMap<String, ProfilePool> = pool
        .profiles
        .iter()
        .map(|(name, target)| {
            let entry = ProfilePool {
                profile: name.clone(),
                target: *target,
                ..ProfilePool::default()
            };
            (name.clone(), entry)
        })
        .collect();
    for row in &rows {
        let entry = profiles
            .entry(row.profile.clone())
            .or_insert_with(|| ProfilePool {
                profile: row.profile.clone(),
                ..ProfilePool::default()
            });
        match row.state {
            SandboxState::Ready => {
                entry.ready += 1;
                if let Some(ready) = row.ready_at_ms {
                    let age = (now_ms - ready).max(0) as f64 / 1000.0;
                    entry.oldest_age_seconds =
                        Some(entry.oldest_age_seconds.map_or(age, |a: f64| a.max(age)));
                }
            }
            SandboxState::Booting => entry.booting += 1,
            _ => entry.destroying += 1,
        }
    }
    for entry in profiles.values_mut() {
        let counts = book.get(&entry.profile);
        entry.hits = counts.hits;
        entry.misses = counts.misses;
        if entry.ready + entry.booting < entry.target {
            entry.refill_waits = counts.refill_waits;
        }
        if counts.backoff_until_ms.is_some_and(|until| until > now_ms) {
            entry.backoff_until_ms = counts.backoff_until_ms;
            entry.last_error = counts.last_error;
        }
    }
    PoolStatus {
        max_idle_seconds: pool.max_idle.as_secs(),
        profiles: profiles.into_values().collect(),
        sandboxes: rows
            .into_iter()
            .map(|sandbox| PoolSandboxView {
                memory_pss_bytes: memory.get(&sandbox.id).map(|m| m.pss_bytes),
                sandbox,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn row(id: &str, profile: &str, state: SandboxState, ready: Option<i64>) -> PoolSandbox {
        PoolSandbox {
            state,
            ready_at_ms: ready,
            ..PoolSandbox::booting(id.into(), profile, "qemu", (1, 512, 4), 0)
        }
    }

    #[test]
    fn counts_each_profile_with_its_book_and_the_oldest_age() {
        let pool = PoolTuning {
            profiles: [
                ("balanced".to_owned(), 2),
                ("high-throughput".to_owned(), 2),
            ]
            .into(),
            max_idle: Duration::from_secs(600),
        };
        let book = PoolBook::default();
        book.hit("balanced");
        book.hit("balanced");
        book.miss("balanced");
        book.failed("high-throughput", "clone failed", 58_000);
        book.refill_waits(
            "high-throughput",
            Some("vCPU budget: 4 committed + 4 > 4".into()),
        );
        // Full: a stale reason does not show.
        book.refill_waits("balanced", Some("jobs are waiting in the queue".into()));
        let rows = vec![
            row("a", "balanced", SandboxState::Ready, Some(40_000)),
            row("b", "balanced", SandboxState::Ready, Some(55_000)),
            row("c", "high-throughput", SandboxState::Booting, None),
            row("d", "dropped", SandboxState::Destroying, Some(1_000)),
        ];
        let memory = HashMap::from([(
            "a".to_owned(),
            VmMemory {
                pss_bytes: 40 << 20,
                rss_bytes: 200 << 20,
            },
        )]);
        let status = pool_status(rows, &pool, &book, &memory, 60_000);
        let names: Vec<&str> = status.profiles.iter().map(|p| p.profile.as_str()).collect();
        assert_eq!(names, ["balanced", "dropped", "high-throughput"]);
        let balanced = &status.profiles[0];
        assert_eq!(
            (
                balanced.target,
                balanced.ready,
                balanced.booting,
                balanced.hits,
                balanced.misses
            ),
            (2, 2, 0, 2, 1)
        );
        assert_eq!(balanced.oldest_age_seconds, Some(20.0));
        assert_eq!(balanced.refill_waits, None);
        assert_eq!(
            (status.profiles[1].target, status.profiles[1].destroying),
            (0, 1)
        );
        let high = &status.profiles[2];
        assert_eq!(high.booting, 1);
        assert_eq!(high.last_error.as_deref(), Some("clone failed"));
        assert_eq!(
            high.refill_waits.as_deref(),
            Some("vCPU budget: 4 committed + 4 > 4")
        );
        assert_eq!(status.sandboxes[0].memory_pss_bytes, Some(40 << 20));
        assert_eq!(status.sandboxes[1].memory_pss_bytes, None);
    }
}
