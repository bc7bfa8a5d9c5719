//! What each sandbox's QEMU really holds in host memory: PSS and RSS from
//! `/proc/PID/smaps_rollup`, read through `procfs`, and a short-lived cache of the measurement.
//!
//! A clone restored from a template snapshot maps the template's RAM file privately, so it shares
//! those pages with every other clone until it writes them: RSS counts them in full for each
//! clone, PSS counts each clone its share. PSS is what a sandbox costs; its `memory_mb` is only
//! what it was committed.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use procfs::process::{MemoryMap, Process, SmapsRollup};
use procfs::{FromBufRead, ProcError};
use tokio::time::Instant;

use crate::backend::{BackendError, MemoryUsage, VmMemory};

/// How long one measurement answers for: walking a large VM's page tables costs real CPU, and a
/// status poll every second must not pay it every time.
pub const MEMORY_USAGE_MAX_AGE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("smaps_rollup has no {0} line")]
    MissingField(&'static str),
    #[error("smaps_rollup holds no rollup")]
    Empty,
    #[error("parsing smaps_rollup: {0}")]
    Parse(#[source] ProcError),
    #[error("reading /proc/{pid}/smaps_rollup: {source}")]
    Read {
        pid: i32,
        #[source]
        source: ProcError,
    },
}

impl From<MemoryError> for BackendError {
    fn from(err: MemoryError) -> Self {
        BackendError::operation("memory usage", err.to_string())
    }
}

/// PSS and RSS out of one smaps_rollup's text (`Key:   N kB` lines under a `[rollup]` header).
pub fn parse_smaps_rollup(text: &str) -> Result<VmMemory, MemoryError> {
    let rollup = SmapsRollup::from_buf_read(text.as_bytes())
        .map_err(|source| MemoryError::Read { pid: 0, source })?;
    from_rollup(&rollup)
}

fn from_rollup(rollup: &SmapsRollup) -> Result<VmMemory, MemoryError> {
    let map: &MemoryMap = rollup
        .memory_map_rollup
        .0
        .first()
        .ok_or(MemoryError::Empty)?;
    // procfs has already turned the kB into bytes.
    let field = |key: &'static str| {
        map.extension
            .map
            .get(key)
            .copied()
            .ok_or(MemoryError::MissingField(key))
    };
    Ok(VmMemory {
        pss_bytes: field("Pss")?,
        rss_bytes: field("Rss")?,
    })
}

/// One process's memory; None when it has exited (or is a zombie, whose rollup is empty).
/// Blocking: reading smaps_rollup walks the process's page tables.
pub fn read_blocking(pid: i32) -> Result<Option<VmMemory>, MemoryError> {
    let read = Process::new(pid).and_then(|process| process.smaps_rollup());
    match read {
        Ok(rollup) => match from_rollup(&rollup) {
            Ok(memory) => Ok(Some(memory)),
            Err(MemoryError::Empty) => Ok(None),
            Err(err) => Err(err),
        },
        Err(ProcError::NotFound(_)) => Ok(None),
        Err(source) => Err(MemoryError::Read { pid, source }),
    }
}

/// Measures each `(vm name, pid)` off the executor, in one blocking task. A process gone since
/// it was found is left out.
pub async fn measure(pids: Vec<(String, i32)>) -> Result<MemoryUsage, BackendError> {
    let by_vm = tokio::task::spawn_blocking(move || {
        let mut by_vm = HashMap::new();
        for (name, pid) in pids {
            if let Some(memory) = read_blocking(pid)? {
                by_vm.insert(name, memory);
            }
        }
        Ok::<_, MemoryError>(by_vm)
    })
    .await
    .map_err(|e| BackendError::operation("memory usage", e.to_string()))??;
    Ok(MemoryUsage { by_vm })
}

/// The last measurement and when it was taken, answered again while younger than `max_age`.
#[derive(Debug)]
pub struct MemoryCache {
    max_age: Duration,
    last: Mutex<Option<(Instant, MemoryUsage)>>,
}

impl MemoryCache {
    pub fn new(max_age: Duration) -> MemoryCache {
        MemoryCache {
            max_age,
            last: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<(Instant, MemoryUsage)>> {
        self.last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The cached measurement if it is fresh, else `measure`'s (kept when it succeeds). Two
    /// callers racing past a stale entry both measure, which costs a little and breaks nothing.
    pub async fn get_or_measure<F, Fut>(&self, measure: F) -> Result<MemoryUsage, BackendError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<MemoryUsage, BackendError>>,
    {
        if let Some((at, usage)) = self.lock().as_ref() {
            if at.elapsed() < self.max_age {
                return Ok(usage.clone());
            }
        }
        let usage = measure().await?;
        *self.lock() = Some((Instant::now(), usage.clone()));
        Ok(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d4c8a00000-7ffc6a3f5000 ---p 00000000 00:00 0                          [rollup]
Rss:             1048576 kB
Pss:              262144 kB
Pss_Dirty:         65536 kB
Pss_Anon:          60000 kB
Pss_File:         200000 kB
Pss_Shmem:          2144 kB
Shared_Clean:     786432 kB
Shared_Dirty:          0 kB
Private_Clean:     196608 kB
Private_Dirty:     65536 kB
Referenced:      1048576 kB
Anonymous:         65536 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
";

    #[test]
    fn parses_pss_and_rss_in_bytes() {
        let memory = parse_smaps_rollup(SAMPLE).unwrap();
        assert_eq!(
            memory,
            VmMemory {
                pss_bytes: 262_144 * 1024,
                rss_bytes: 1_048_576 * 1024,
            }
        );
    }

    #[test]
    fn a_rollup_without_pss_is_an_error_and_an_empty_one_says_empty() {
        let no_pss: String = SAMPLE
            .lines()
            .filter(|l| !l.starts_with("Pss:"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(matches!(
            parse_smaps_rollup(&no_pss),
            Err(MemoryError::MissingField("Pss"))
        ));
        assert!(matches!(parse_smaps_rollup(""), Err(MemoryError::Empty)));
    }

    #[tokio::test]
    async fn measures_a_live_process_and_leaves_out_one_that_has_exited() {
        let me = i32::try_from(std::process::id()).unwrap();
        // A child that has exited and been reaped: its pid names no process.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = i32::try_from(child.id()).unwrap();
        child.wait().unwrap();

        let usage = measure(vec![
            ("sandbox-me".into(), me),
            ("sandbox-gone".into(), gone),
        ])
        .await
        .unwrap();
        let mine = usage.by_vm.get("sandbox-me").copied().unwrap();
        assert!(mine.pss_bytes > 0, "{mine:?}");
        assert!(mine.rss_bytes >= mine.pss_bytes, "{mine:?}");
        assert!(!usage.by_vm.contains_key("sandbox-gone"), "{usage:?}");
    }

    fn usage(pss_bytes: u64) -> MemoryUsage {
        MemoryUsage {
            by_vm: HashMap::from([(
                "sandbox-a".to_owned(),
                VmMemory {
                    pss_bytes,
                    rss_bytes: pss_bytes,
                },
            )]),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_answers_until_it_is_max_age_old_and_keeps_nothing_on_failure() {
        let cache = MemoryCache::new(Duration::from_secs(3));
        let first = cache.get_or_measure(|| async { Ok(usage(1)) }).await;
        assert_eq!(first.unwrap(), usage(1));

        tokio::time::advance(Duration::from_secs(2)).await;
        let cached = cache.get_or_measure(|| async { Ok(usage(2)) }).await;
        assert_eq!(cached.unwrap(), usage(1), "younger than max age: cached");

        tokio::time::advance(Duration::from_secs(1)).await;
        let failed = cache
            .get_or_measure(|| async { Err(BackendError::operation("memory usage", "boom")) })
            .await;
        assert!(failed.is_err());
        let fresh = cache.get_or_measure(|| async { Ok(usage(3)) }).await;
        assert_eq!(
            fresh.unwrap(),
            usage(3),
            "stale, and the failure kept nothing"
        );
    }
}
