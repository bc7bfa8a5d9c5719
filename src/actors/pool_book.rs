//! The warm pool's book: per profile, how many admitted jobs took a READY sandbox (hits) and how
//! many found none (misses), and the boot failures that hold a profile's refills back. Shared by
//! the Supervisor (which counts claims and asks whether a profile may refill), the PoolKeeper
//! (which records boots) and `GET /v1/pool`. Times are on the services' clock.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// The first wait after a failed pool boot; doubled per failure in a row, up to `BACKOFF_MAX`.
const BACKOFF_FIRST: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// One profile's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProfileBook {
    pub hits: u64,
    pub misses: u64,
    /// Pool boots that failed in a row (0 after one succeeds).
    pub failures: u32,
    /// No refill of this profile before this (ms on the services' clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_until_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Why the last admission round booted less than the pool's deficit (None: it booted all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refill_waits: Option<String>,
}

#[derive(Debug, Default)]
pub struct PoolBook {
    profiles: Mutex<BTreeMap<String, ProfileBook>>,
}

impl PoolBook {
    fn with<T>(&self, profile: &str, f: impl FnOnce(&mut ProfileBook) -> T) -> T {
        let mut profiles = self.profiles.lock().unwrap_or_else(|p| p.into_inner());
        f(profiles.entry(profile.to_owned()).or_default())
    }

    pub fn hit(&self, profile: &str) {
        self.with(profile, |b| b.hits += 1);
    }

    pub fn miss(&self, profile: &str) {
        self.with(profile, |b| b.misses += 1);
    }

    /// A pool boot of `profile` reached READY.
    pub fn booted(&self, profile: &str) {
        self.with(profile, |b| {
            b.failures = 0;
            b.backoff_until_ms = None;
        });
    }

    /// A pool boot of `profile` failed at `now_ms`: its refills wait, longer after each failure
    /// in a row, so a broken template does not boot and destroy VMs in a loop. Returns the wait.
    pub fn failed(&self, profile: &str, error: &str, now_ms: i64) -> Duration {
        self.with(profile, |b| {
            b.failures = b.failures.saturating_add(1);
            let wait = BACKOFF_FIRST
                .saturating_mul(1 << (b.failures - 1).min(16))
                .min(BACKOFF_MAX);
            b.backoff_until_ms =
                Some(now_ms.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)));
            b.last_error = Some(error.to_owned());
            wait
        })
    }

    /// Whether `profile` may boot a pool sandbox at `now_ms`.
    pub fn may_refill(&self, profile: &str, now_ms: i64) -> bool {
        self.with(profile, |b| b.backoff_until_ms.is_none_or(|t| now_ms >= t))
    }

    /// What the last admission round said of `profile`'s refill.
    pub fn refill_waits(&self, profile: &str, why: Option<String>) {
        self.with(profile, |b| b.refill_waits = why);
    }

    pub fn get(&self, profile: &str) -> ProfileBook {
        self.with(profile, |b| b.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_in_a_row_back_off_longer_and_a_success_clears_them() {
        let book = PoolBook::default();
        assert!(book.may_refill("balanced", 0));
        assert_eq!(
            book.failed("balanced", "clone failed", 1_000),
            BACKOFF_FIRST
        );
        assert!(!book.may_refill("balanced", 1_000));
        assert!(book.may_refill("balanced", 6_000));
        assert_eq!(
            book.failed("balanced", "clone failed", 6_000),
            BACKOFF_FIRST * 2
        );
        for _ in 0..20 {
            book.failed("balanced", "clone failed", 6_000);
        }
        assert_eq!(book.get("balanced").backoff_until_ms, Some(306_000));
        // Another profile is not held back.
        assert!(book.may_refill("high-throughput", 6_000));
        book.booted("balanced");
        assert!(book.may_refill("balanced", 6_000));
        assert_eq!(book.get("balanced").failures, 0);
        assert_eq!(
            book.get("balanced").last_error.as_deref(),
            Some("clone failed")
        );
    }

    #[test]
    fn hits_and_misses_are_counted_per_profile() {
        let book = PoolBook::default();
        book.hit("balanced");
        book.hit("balanced");
        book.miss("balanced");
        book.miss("high-throughput");
        assert_eq!(
            (book.get("balanced").hits, book.get("balanced").misses),
            (2, 1)
        );
        assert_eq!(book.get("high-throughput").misses, 1);
    }
}
