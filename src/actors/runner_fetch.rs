//! The runner fetch a sandbox's seed carries when the daemon serves its runner: a job's, with a
//! runner token scoped to the job, or a pool sandbox's, scoped to that pool sandbox (booted
//! before any job, it has none). Both name the same binary's sha256, so a job and a pool sandbox
//! of one profile map to one snapshot on the local backend, whose id takes the sha256 and never
//! the token.

use std::time::Duration;

use super::Services;
use crate::backend::RunnerFetch;
use crate::config::tuning::Tuning;
use crate::model::Phase;
use crate::runner_binary::RunnerBinary;
use crate::store::StoreError;

/// The fetch of `binary` from the daemon's guest endpoint `guest_url` with `token`.
pub fn fetch(guest_url: &str, binary: &RunnerBinary, token: String) -> RunnerFetch {
    RunnerFetch {
        url: format!("{}/guest/v1/runner", guest_url.trim_end_matches('/')),
        token,
        sha256: binary.sha256.clone(),
    }
}

/// How long a pool sandbox's runner token lives: its boot's phases at most (the guest fetches
/// the runner during its boot, or the template VM of the snapshot its clone makes does), never
/// more than any token's `token_ttl`. A pool sandbox may then sit READY for hours: it needs the
/// token no more, and a job that takes it brings tokens of its own.
pub fn pool_token_ttl(tuning: &Tuning, token_ttl: Duration) -> Duration {
    let boot = Phase::PROVISIONING
        .iter()
        .fold(Duration::ZERO, |sum, phase| {
            sum.saturating_add(tuning.phase_timeouts.get(*phase))
        });
    boot.min(token_ttl)
}

/// The runner fetch for the pool sandbox `pool_id` (its row written), with a token issued for it;
/// None when the daemon serves no runner and the template brings its own.
pub async fn for_pool(svc: &Services, pool_id: &str) -> Result<Option<RunnerFetch>, StoreError> {
    let Some(binary) = svc.runner.as_ref() else {
        return Ok(None);
    };
    let ttl = pool_token_ttl(&svc.tuning.get(), svc.config.token_ttl());
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let id = pool_id.to_owned();
    let token = svc
        .store
        .call(move |s| s.issue_pool_runner_token(&id, ttl_ms))
        .await?;
    Ok(Some(fetch(&svc.guest_url, binary, token)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary() -> RunnerBinary {
        RunnerBinary {
            path: "/srv/agentlab-runner".into(),
            size: 1,
            sha256: "cd".repeat(32),
        }
    }

    #[test]
    fn a_jobs_and_a_pool_sandboxs_fetch_differ_in_their_token_only() {
        let job = fetch("http://10.0.2.100/", &binary(), "job-token".into());
        let pool = fetch("http://10.0.2.100", &binary(), "pool-token".into());
        assert_eq!(job.url, "http://10.0.2.100/guest/v1/runner");
        assert_eq!((&job.url, &job.sha256), (&pool.url, &pool.sha256));
        assert_ne!(job.token, pool.token);
    }

    #[test]
    fn a_pool_token_lives_as_long_as_the_boot_and_never_past_token_ttl() {
        let tuning = Tuning::default();
        let t = &tuning.phase_timeouts;
        let boot = t.clone + t.start + t.cloud_init + t.guest_agent;
        assert_eq!(pool_token_ttl(&tuning, Duration::from_secs(86_400)), boot);
        assert_eq!(
            pool_token_ttl(&tuning, Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }
}
