//! The PoolKeeper: boots the pool sandboxes that the Supervisor's admission rounds decide on
//! (the rows are written there, in the round, so the governor counts them at once), destroys the
//! idle ones that are past `pool.max_idle`, beyond their profile's target or asked for by an
//! eviction, and retries destroys that failed. A READY sandbox leaves the pool only through the
//! store: a job's claim or `begin_pool_destroy`, each in one transaction, so a sandbox being
//! destroyed is never handed to a job and a claimed one is never destroyed here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use actix::prelude::*;
use tokio_util::sync::CancellationToken;

use super::lifecycle::destroy_vm_named;
use super::pool_boot::{self, BootError};
use super::supervisor::Admit;
use super::Services;
use crate::backend::BackendError;
use crate::model::{PoolSandbox, SandboxState};
use crate::store::StoreError;

#[derive(Debug)]
pub struct PoolKeeper {
    svc: Arc<Services>,
    supervisor: Recipient<Admit>,
    /// Boots under way, by pool sandbox id.
    booting: HashMap<String, CancellationToken>,
    /// Destroys under way.
    destroying: HashSet<String>,
    /// Housekeeping runs once the start-up reconcile has settled the pool rows.
    tidying: bool,
}

/// Boot these pool sandboxes (their BOOTING rows are in the store).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Provision(pub Vec<PoolSandbox>);

/// Destroy these idle pool sandboxes: the host is short and a queued job waits.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Evict(pub Vec<String>);

/// Look at the pool now (after a reload, say), and from then on every reconcile interval.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Tidy;

/// Stop every boot (shutdown); their rows stay BOOTING and the next start-up destroys them.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopBoots;

impl PoolKeeper {
    pub fn new(svc: Arc<Services>, supervisor: Recipient<Admit>) -> PoolKeeper {
        PoolKeeper {
            svc,
            supervisor,
            booting: HashMap::new(),
            destroying: HashSet::new(),
            tidying: false,
        }
    }

    fn start_boot(&mut self, row: PoolSandbox, ctx: &mut Context<Self>) {
        if self.booting.contains_key(&row.id) {
            return;
        }
        let cancel = CancellationToken::new();
        self.booting.insert(row.id.clone(), cancel.clone());
        let svc = Arc::clone(&self.svc);
        let id = row.id.clone();
        ctx.spawn(
            async move { boot_one(&svc, &row, &cancel).await }
                .into_actor(self)
                .map(move |ready, keeper, ctx| {
                    keeper.booting.remove(&id);
                    match ready {
                        // READY: a queued job may take it now.
                        Ok(true) => keeper.supervisor.do_send(Admit),
                        // Failed or stopped: its VM goes (whatever of it was made).
                        Ok(false) => keeper.destroy(
                            vec![id],
                            &[SandboxState::Booting, SandboxState::Destroying],
                            ctx,
                        ),
                        Err(err) => {
                            tracing::error!(sandbox = %id, %err, "a pool boot failed on the store");
                            keeper.destroy(vec![id], &[SandboxState::Booting], ctx);
                        }
                    }
                }),
        );
    }

    /// Destroys each pool sandbox that is in one of `from` (and not already on its way out),
    /// then lets admission look again: a waiting job may fit now.
    fn destroy(
        &mut self,
        ids: Vec<String>,
        from: &'static [SandboxState],
        ctx: &mut Context<Self>,
    ) {
        let ids: Vec<String> = ids
            .into_iter()
            .filter(|id| !self.booting.contains_key(id) && self.destroying.insert(id.clone()))
            .collect();
        if ids.is_empty() {
            return;
        }
        let svc = Arc::clone(&self.svc);
        let taken = ids.clone();
        ctx.spawn(
            async move {
                let mut any = false;
                for id in taken {
                    match destroy_pool_sandbox(&svc, &id, from, None).await {
                        Ok(done) => any |= done,
                        Err(err) => {
                            tracing::warn!(sandbox = %id, %err, "destroying a pool sandbox failed; it is retried")
                        }
                    }
                }
                any
            }
            .into_actor(self)
            .map(move |any, keeper, _| {
                for id in &ids {
                    keeper.destroying.remove(id);
                }
                if any {
                    keeper.supervisor.do_send(Admit);
                }
            }),
        );
    }

    /// Destroys READY sandboxes past `max_idle`, beyond their profile's target (oldest first)
    /// or of a profile with no pool any more, and retries failed destroys.
    fn tidy(&mut self, ctx: &mut Context<Self>) {
        let svc = Arc::clone(&self.svc);
        ctx.spawn(
            async move { svc.store.call(|s| s.pool_sandboxes()).await }
                .into_actor(self)
                .map(|rows, keeper, ctx| {
                    let rows = match rows {
                        Ok(rows) => rows,
                        Err(err) => {
                            tracing::error!(%err, "reading the pool failed");
                            return;
                        }
                    };
                    let tuning = keeper.svc.tuning.get();
                    let now = keeper.svc.clock.now_ms();
                    let (stale, retry) = due_for_destroy(&rows, &tuning.pool, now);
                    if !stale.is_empty() {
                        tracing::info!(sandboxes = ?stale, "replacing or dropping idle pool sandboxes");
                    }
                    keeper.destroy(stale, &[SandboxState::Ready], ctx);
                    keeper.destroy(retry, &[SandboxState::Destroying], ctx);
                    // A deficit (after a reload, or once these are gone) is refilled by admission.
                    keeper.supervisor.do_send(Admit);
                }),
        );
    }

    fn schedule_tidy(&self, ctx: &mut Context<Self>) {
        let every = self.svc.tuning.get().intervals.reconcile;
        ctx.run_later(every, |keeper, ctx| {
            keeper.tidy(ctx);
            keeper.schedule_tidy(ctx);
        });
    }
}

/// Which pool sandboxes are due to go: (READY ones to destroy, DESTROYING ones to retry).
pub fn due_for_destroy(
    rows: &[PoolSandbox],
    pool: &crate::config::pool::PoolTuning,
    now_ms: i64,
) -> (Vec<String>, Vec<String>) {
    let max_idle_ms = i64::try_from(pool.max_idle.as_millis()).unwrap_or(i64::MAX);
    let mut kept: BTreeMap<&str, u32> = BTreeMap::new();
    let mut stale = Vec::new();
    let mut retry = Vec::new();
    // Newest first, so the ones kept within the target are the freshest. BOOTING ones do not
    // count here: a surplus they make (after a reload lowered the target) goes once READY.
    let mut ordered: Vec<&PoolSandbox> = rows.iter().collect();
    ordered.sort_by_key(|r| {
        std::cmp::Reverse((r.ready_at_ms.unwrap_or(r.created_at_ms), r.id.clone()))
    });
    for row in ordered {
        match row.state {
            SandboxState::Destroying => retry.push(row.id.clone()),
            SandboxState::Ready => {
                let idle_too_long = row
                    .ready_at_ms
                    .is_some_and(|ready| now_ms.saturating_sub(ready) > max_idle_ms);
                let count = kept.entry(&row.profile).or_default();
                if idle_too_long || *count >= pool.target(&row.profile) {
                    stale.push(row.id.clone());
                } else {
                    *count += 1;
                }
            }
            _ => {}
        }
    }
    (stale, retry)
}

/// Boots one pool sandbox and marks it READY. Ok(true): READY; Ok(false): the boot failed (or
/// was stopped) and the row is left for the caller to destroy.
async fn boot_one(
    svc: &Services,
    row: &PoolSandbox,
    cancel: &CancellationToken,
) -> Result<bool, StoreError> {
    let Some(profile) = svc.profiles().get(&row.profile).cloned() else {
        tracing::warn!(sandbox = %row.id, profile = %row.profile, "the pool's profile is gone");
        return Ok(false);
    };
    let started = std::time::Instant::now();
    match pool_boot::boot(svc, row, &profile, cancel).await {
        Ok(booted) => {
            let (id, at) = (row.id.clone(), svc.clock.now_ms());
            let ready = svc
                .store
                .call(move |s| {
                    s.set_pool_ready(&id, booted.method, booted.snapshot_id.as_deref(), at)
                })
                .await?;
            if ready {
                svc.pool.booted(&row.profile);
                tracing::info!(sandbox = %row.id, profile = %row.profile,
                    seconds = started.elapsed().as_secs_f64(), "pool sandbox ready");
            }
            Ok(ready)
        }
        Err(BootError::Cancelled) => Ok(false),
        Err(BootError::Store(err)) => Err(err),
        Err(err) => {
            let wait = svc
                .pool
                .failed(&row.profile, &err.to_string(), svc.clock.now_ms());
            tracing::warn!(sandbox = %row.id, profile = %row.profile, %err, ?wait,
                "a pool boot failed; this profile's refills wait");
            let (id, message) = (row.id.clone(), err.to_string());
            svc.store
                .call(move |s| s.pool_destroy_failed(&id, &message))
                .await?;
            Ok(false)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolDestroyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Phase(#[from] super::lifecycle::PhaseError),
}

/// Destroys a pool sandbox's VM if the row is in one of `from` (marking it DESTROYING first, so
/// no job can take it), and forgets the row. Ok(false): it was not in one of `from` (a job took
/// it, say). A failed destroy leaves the row DESTROYING with the error, for a retry.
pub async fn destroy_pool_sandbox(
    svc: &Services,
    id: &str,
    from: &'static [SandboxState],
    why: Option<&str>,
) -> Result<bool, PoolDestroyError> {
    let (key, why_owned) = (id.to_owned(), why.map(str::to_owned));
    let Some(row) = svc
        .store
        .call(move |s| s.begin_pool_destroy(&key, from, why_owned.as_deref()))
        .await?
    else {
        return Ok(false);
    };
    let limit = svc.tuning.get().phase_timeouts.destroy;
    let destroyed =
        tokio::time::timeout(limit, destroy_vm_named(svc, &row.id, row.vm_ref.as_deref()))
            .await
            .unwrap_or(Err(super::lifecycle::PhaseError::Backend(
                BackendError::Timeout {
                    operation: "destroy",
                    seconds: limit.as_secs_f64(),
                },
            )));
    let key = row.id.clone();
    match destroyed {
        Ok(()) => {
            svc.store.call(move |s| s.remove_pool_sandbox(&key)).await?;
            Ok(true)
        }
        Err(err) => {
            let message = err.to_string();
            svc.store
                .call(move |s| s.pool_destroy_failed(&key, &message))
                .await?;
            Err(err.into())
        }
    }
}

/// How long a READY pool sandbox's guest agent has to answer after a restart to be adopted.
const ADOPT_PING: std::time::Duration = std::time::Duration::from_secs(5);

/// At start-up, before anything is admitted: the pool sandboxes the last daemon left. BOOTING
/// and DESTROYING ones are destroyed (a boot is not resumed); a READY one is adopted again when
/// its profile still keeps a pool, it is younger than `pool.max_idle` and its guest agent
/// answers, and destroyed otherwise. A failed destroy stays DESTROYING for the keeper's retry.
/// Returns the ids adopted.
pub async fn settle_pool(svc: &Services) -> Result<Vec<String>, StoreError> {
    let rows = svc.store.call(|s| s.pool_sandboxes()).await?;
    let tuning = svc.tuning.get();
    let since = super::pool_plan::ready_since_ms(&tuning.pool, svc.clock.now_ms());
    let mut adopted = Vec::new();
    for row in rows {
        let why = match row.state {
            SandboxState::Ready => adoption_refused(svc, &row, &tuning.pool, since).await,
            _ => Some("its boot was cut off by the daemon's restart".to_owned()),
        };
        let Some(why) = why else {
            tracing::info!(sandbox = %row.id, profile = %row.profile, "adopted a READY pool sandbox");
            adopted.push(row.id);
            continue;
        };
        tracing::info!(sandbox = %row.id, %why, "destroying a pool sandbox the last daemon left");
        let from = &[
            SandboxState::Booting,
            SandboxState::Ready,
            SandboxState::Destroying,
        ];
        match destroy_pool_sandbox(svc, &row.id, from, Some(&why)).await {
            Ok(_) => {}
            Err(PoolDestroyError::Store(err)) => return Err(err),
            Err(err) => {
                tracing::warn!(sandbox = %row.id, %err, "destroying a pool sandbox failed; it is retried")
            }
        }
    }
    Ok(adopted)
}

/// Why a READY pool sandbox found at start-up is not adopted again; None: it is.
async fn adoption_refused(
    svc: &Services,
    row: &PoolSandbox,
    pool: &crate::config::pool::PoolTuning,
    ready_since_ms: i64,
) -> Option<String> {
    if pool.target(&row.profile) == 0 {
        return Some(format!(
            "the {} profile keeps no pool any more",
            row.profile
        ));
    }
    if row.ready_at_ms.is_none_or(|ready| ready < ready_since_ms) {
        return Some("idle for longer than pool.max_idle".to_owned());
    }
    let Some(vm_ref) = row.vm_ref.clone() else {
        return Some("no VM recorded".to_owned());
    };
    let vm = crate::backend::VmHandle {
        name: row.id.clone(),
        vm_ref,
    };
    match tokio::time::timeout(ADOPT_PING, svc.backend.agent_ping(&vm)).await {
        Ok(Ok(())) => None,
        Ok(Err(err)) => Some(format!("its guest agent did not answer: {err}")),
        Err(_) => Some(format!(
            "its guest agent did not answer within {}s",
            ADOPT_PING.as_secs()
        )),
    }
}

impl Actor for PoolKeeper {
    type Context = Context<Self>;
}

impl Handler<Provision> for PoolKeeper {
    type Result = ();
    fn handle(&mut self, msg: Provision, ctx: &mut Self::Context) {
        for row in msg.0 {
            tracing::info!(sandbox = %row.id, profile = %row.profile, "booting a pool sandbox");
            self.start_boot(row, ctx);
        }
    }
}

impl Handler<Evict> for PoolKeeper {
    type Result = ();
    fn handle(&mut self, msg: Evict, ctx: &mut Self::Context) {
        tracing::info!(sandboxes = ?msg.0, "the host is short: destroying idle pool sandboxes");
        self.destroy(msg.0, &[SandboxState::Ready], ctx);
    }
}

impl Handler<Tidy> for PoolKeeper {
    type Result = ();
    fn handle(&mut self, _: Tidy, ctx: &mut Self::Context) {
        self.tidy(ctx);
        if !std::mem::replace(&mut self.tidying, true) {
            self.schedule_tidy(ctx);
        }
    }
}

impl Handler<StopBoots> for PoolKeeper {
    type Result = ();
    fn handle(&mut self, _: StopBoots, _: &mut Self::Context) {
        for cancel in self.booting.values() {
            cancel.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::pool::PoolTuning;
    use std::time::Duration;

    fn row(id: &str, profile: &str, state: SandboxState, ready_at: Option<i64>) -> PoolSandbox {
        PoolSandbox {
            state,
            ready_at_ms: ready_at,
            ..PoolSandbox::booting(
                id.into(),
                profile,
                "qemu",
                (1, 512, 4),
                ready_at.unwrap_or(0) - 10,
            )
        }
    }

    fn pool(targets: &[(&str, u32)], max_idle: Duration) -> PoolTuning {
        PoolTuning {
            profiles: targets.iter().map(|(p, n)| ((*p).to_owned(), *n)).collect(),
            max_idle,
        }
    }

    #[test]
    fn idle_too_long_surplus_and_dropped_profiles_go_and_the_freshest_stay() {
        let rows = vec![
            row("old", "balanced", SandboxState::Ready, Some(1_000)),
            row("fresh", "balanced", SandboxState::Ready, Some(50_000)),
            row("fresher", "balanced", SandboxState::Ready, Some(60_000)),
            row("booting", "balanced", SandboxState::Booting, None),
            row("other", "gone", SandboxState::Ready, Some(60_000)),
            row("stuck", "balanced", SandboxState::Destroying, Some(60_000)),
        ];
        // Target 1: only the freshest READY one stays; "old" is idle too long anyway.
        let (stale, retry) = due_for_destroy(
            &rows,
            &pool(&[("balanced", 1)], Duration::from_secs(30)),
            61_000,
        );
        let mut stale_sorted = stale.clone();
        stale_sorted.sort();
        assert_eq!(stale_sorted, vec!["fresh", "old", "other"]);
        assert_eq!(retry, vec!["stuck"]);
        // A bigger target keeps the fresh ones; max_idle still takes "old".
        let (stale, _) = due_for_destroy(
            &rows,
            &pool(&[("balanced", 2)], Duration::from_secs(30)),
            61_000,
        );
        let mut stale_sorted = stale;
        stale_sorted.sort();
        assert_eq!(stale_sorted, vec!["old", "other"]);
    }
}
