//! What an admission round tells the governor about the warm pool: the idle READY sandboxes a
//! queued job may take (oldest first; those past `pool.max_idle` are due for replacement and
//! not handed out), and the pool sandboxes missing from each profile's target, round-robin over
//! the profiles so one big pool does not starve another. Pure: the round reads the store.

use std::collections::BTreeMap;

use super::governor::{IdlePool, Refill};
use crate::config::pool::PoolTuning;
use crate::config::profile::Profiles;
use crate::governor::policy::Demand;
use crate::model::SandboxState;
use crate::store::Holding;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PoolPlan {
    pub idle: Vec<IdlePool>,
    pub refill: Vec<Refill>,
}

/// The oldest READY time a pool sandbox may have to be handed to a job at `now_ms`.
pub fn ready_since_ms(pool: &PoolTuning, now_ms: i64) -> i64 {
    now_ms.saturating_sub(i64::try_from(pool.max_idle.as_millis()).unwrap_or(i64::MAX))
}

/// The pool's part of one admission round. `may_refill` says whether a profile's boots are
/// not backing off after failures; `size` turns a profile's size into what the backend
/// allocates.
pub fn plan(
    holdings: &[Holding],
    pool: &PoolTuning,
    profiles: &Profiles,
    now_ms: i64,
    may_refill: impl Fn(&str) -> bool,
    size: impl Fn(Demand) -> Demand,
) -> PoolPlan {
    let since = ready_since_ms(pool, now_ms);
    let mut idle: Vec<(i64, IdlePool)> = holdings
        .iter()
        .filter(|h| h.is_idle_pool())
        .filter_map(|h| {
            let ready = h.ready_at_ms?;
            let (vcpus, memory_mb, disk_gb) = h.resources?;
            (ready >= since && profiles.get(&h.profile).is_some()).then(|| {
                (
                    ready,
                    IdlePool {
                        id: h.vm.clone(),
                        profile: h.profile.clone(),
                        demand: size(Demand {
                            vcpus,
                            memory_mb,
                            disk_gb,
                        }),
                    },
                )
            })
        })
        .collect();
    idle.sort_by(|a, b| (a.0, &a.1.id).cmp(&(b.0, &b.1.id)));

    let mut have: BTreeMap<&str, u32> = BTreeMap::new();
    for h in holdings {
        if h.job_id.is_none() && matches!(h.pool, Some(SandboxState::Ready | SandboxState::Booting))
        {
            *have.entry(&h.profile).or_default() += 1;
        }
    }
    let deficits: Vec<(String, Demand, u32)> = pool
        .profiles
        .iter()
        .filter_map(|(name, target)| {
            let missing = target.saturating_sub(have.get(name.as_str()).copied().unwrap_or(0));
            let profile = profiles.get(name)?;
            (missing > 0 && may_refill(name))
                .then(|| (name.clone(), size(Demand::of(profile)), missing))
        })
        .collect();
    let most = deficits.iter().map(|d| d.2).max().unwrap_or(0);
    let mut refill = Vec::new();
    for round in 0..most {
        for (profile, demand, missing) in &deficits {
            if round < *missing {
                refill.push(Refill {
                    profile: profile.clone(),
                    demand: *demand,
                });
            }
        }
    }
    PoolPlan {
        idle: idle.into_iter().map(|(_, p)| p).collect(),
        refill,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    fn profiles() -> Profiles {
        Profiles::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles")).unwrap()
    }

    fn pooled(id: &str, profile: &str, state: SandboxState, ready: Option<i64>) -> Holding {
        Holding {
            vm: id.into(),
            job_id: None,
            profile: profile.into(),
            resources: Some((1, 512, 4)),
            booting: state == SandboxState::Booting,
            pool: Some(state),
            ready_at_ms: ready,
        }
    }

    fn tuning(targets: &[(&str, u32)]) -> PoolTuning {
        PoolTuning {
            profiles: targets.iter().map(|(p, n)| ((*p).to_owned(), *n)).collect(),
            max_idle: Duration::from_secs(60),
        }
    }

    #[test]
    fn idle_sandboxes_come_oldest_first_and_stale_or_taken_ones_are_not_offered() {
        let mut taken = pooled("taken", "balanced", SandboxState::Ready, Some(90_000));
        taken.job_id = Some("job".into());
        let holdings = vec![
            pooled("newer", "balanced", SandboxState::Ready, Some(95_000)),
            pooled("older", "balanced", SandboxState::Ready, Some(80_000)),
            pooled("stale", "balanced", SandboxState::Ready, Some(10_000)),
            pooled("booting", "balanced", SandboxState::Booting, None),
            pooled("going", "balanced", SandboxState::Destroying, Some(90_000)),
            taken,
        ];
        let plan = plan(
            &holdings,
            &tuning(&[("balanced", 3)]),
            &profiles(),
            100_000,
            |_| true,
            |d| d,
        );
        let ids: Vec<&str> = plan.idle.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["older", "newer"]);
        // READY (stale ones too, until replaced) and BOOTING fill the target of 3.
        assert!(plan.refill.is_empty(), "{:?}", plan.refill);
    }

    #[test]
    fn deficits_are_refilled_round_robin_and_a_backing_off_or_unknown_profile_is_skipped() {
        let holdings = vec![pooled("one", "balanced", SandboxState::Ready, Some(99_000))];
        let pool = tuning(&[
            ("balanced", 3),
            ("high-throughput", 2),
            ("nonesuch", 2),
            ("yolo-ephemeral", 1),
        ]);
        let plan = plan(
            &holdings,
            &pool,
            &profiles(),
            100_000,
            |p| p != "yolo-ephemeral",
            |d| d,
        );
        let order: Vec<&str> = plan.refill.iter().map(|r| r.profile.as_str()).collect();
        assert_eq!(
            order,
            ["balanced", "high-throughput", "balanced", "high-throughput"]
        );
        let balanced = Demand::of(profiles().get("balanced").unwrap());
        assert_eq!(plan.refill[0].demand, balanced);
    }
}
