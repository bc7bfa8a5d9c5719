//! Reconciliation of the store with the backend, at start-up and periodically:
//! - a RUNNING job with no actor is resumed from its persisted phase;
//! - a sandbox whose job is over but whose VM may remain (a failed or interrupted destroy) is
//!   destroyed, unless it is KEPT (its lease decides);
//! - a VM the backend lists under our name prefix that the store does not hold live is destroyed
//!   if it carries this daemon's instance id; one that carries another id, or none (made by hand,
//!   by another agentlabd on the same host, or by a daemon from before instance ids), is left
//!   alone and reported as foreign: warned about when first seen, listed in `GET /v1/status`;
//! - what the backend keeps outside its VMs for VMs that are gone (pve snippets) is swept;
//! - the warm pool's VMs count as known (their rows are the PoolKeeper's to settle).

use std::collections::HashSet;

use super::lifecycle::{destroy_sandbox, PhaseError};
use super::Services;
use crate::backend::BackendError;
use crate::instance::ForeignVm;
use crate::model::SandboxState;
use crate::store::StoreError;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// RUNNING jobs that have no actor: the supervisor resumes them.
    pub resume: Vec<String>,
    /// Sandboxes destroyed because their job is over.
    pub destroyed_sandboxes: Vec<String>,
    /// VMs of ours destroyed because the store did not know them.
    pub destroyed_orphans: Vec<String>,
    /// VMs under our prefix that this daemon did not make, left alone.
    pub foreign: Vec<ForeignVm>,
    /// What `Backend::sweep` removed.
    pub swept: Vec<String>,
}

impl ReconcileReport {
    /// Whether the pass changed anything (foreign VMs, left alone, do not count).
    pub fn acted(&self) -> bool {
        !(self.resume.is_empty()
            && self.destroyed_sandboxes.is_empty()
            && self.destroyed_orphans.is_empty()
            && self.swept.is_empty())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("listing the backend's VMs: {0}")]
    Backend(#[from] BackendError),
}

/// `active` holds the jobs that have an actor now or whose teardown is under way; they are left
/// alone.
pub async fn reconcile(
    svc: &Services,
    active: &HashSet<String>,
) -> Result<ReconcileReport, ReconcileError> {
    let mut report = ReconcileReport::default();
    // List the backend before reading the store: a sandbox row is written before its VM is
    // cloned, so any VM in this listing already has its row by the time the store is read.
    let vms = svc.backend.list_vms().await?;
    let (running_jobs, live, pooled) = svc
        .store
        .call(|s| Ok((s.running_jobs()?, s.live_sandboxes()?, s.pool_sandboxes()?)))
        .await?;

    report.resume = running_jobs
        .iter()
        .map(|j| j.id.clone())
        .filter(|id| !active.contains(id))
        .collect();
    let running: HashSet<&str> = running_jobs.iter().map(|j| j.id.as_str()).collect();

    for sandbox in &live {
        // A job in `active` is being destroyed by the Supervisor right now (a teardown or a
        // destroy by request): one destroy at a time.
        if running.contains(sandbox.job_id.as_str())
            || sandbox.state == SandboxState::Kept
            || active.contains(&sandbox.job_id)
        {
            continue;
        }
        match destroy_sandbox(svc, sandbox).await {
            Ok(()) => report.destroyed_sandboxes.push(sandbox.id.clone()),
            Err(err) => {
                tracing::warn!(sandbox = %sandbox.id, %err, "destroying a leftover sandbox failed")
            }
        }
    }

    // Pool sandboxes are the PoolKeeper's (and, at start-up, `pool::settle_pool`'s).
    let known: HashSet<&str> = live
        .iter()
        .map(|s| s.id.as_str())
        .chain(pooled.iter().map(|p| p.id.as_str()))
        .collect();
    let ours = svc.instance.id.as_str();
    for listed in vms {
        let vm = listed.vm;
        if known.contains(vm.name.as_str()) {
            continue;
        }
        if listed.owner.as_deref() != Some(ours) {
            report.foreign.push(ForeignVm {
                name: vm.name,
                vm_ref: vm.vm_ref,
                owner: listed.owner,
            });
            continue;
        }
        tracing::warn!(vm = %vm.name, "destroying a VM of ours the store does not know");
        match svc.backend.destroy_vm(&vm).await {
            Ok(()) => report.destroyed_orphans.push(vm.name),
            Err(err) => {
                tracing::warn!(vm = %vm.name, error = %PhaseError::from(err), "destroying an orphan VM failed")
            }
        }
    }
    // Every pass finds them again: warn once, when one first shows up.
    for vm in svc.instance.replace_foreign(report.foreign.clone()) {
        tracing::warn!(vm = %vm.name, vm_ref = %vm.vm_ref, owner = vm.owner.as_deref().unwrap_or("none"),
            "a VM under our name prefix that this daemon did not make; left alone");
    }
    // After the orphans, so that their leftovers go in the same pass. A failed sweep is retried
    // on the next pass and does not hold up resuming jobs.
    match svc.backend.sweep().await {
        Ok(swept) => report.swept = swept,
        Err(err) => tracing::warn!(%err, "sweeping leftovers of gone VMs failed"),
    }
    if report.acted() {
        tracing::info!(?report, "reconciled");
    }
    Ok(report)
}
