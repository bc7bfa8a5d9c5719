//! The ResourceGovernor's pure parts: host readings, the sampler that takes them, the admission
//! policy (static budget, dynamic signals with hysteresis, the adaptive boot cap), and the status
//! it shows. The actor that runs them is `actors::governor`.

pub mod boot_cap;
pub mod policy;
pub mod readings;
pub mod sampler;
pub mod status;

use crate::backend::{Backend, MemoryUsage};
use crate::config::profile::Profiles;
use crate::store::Holding;
use policy::{Committed, Demand};
use status::MemoryStatus;

/// Adds up what live sandboxes (and admitted jobs not holding one yet) hold. A sandbox row carries
/// its own resources; an admitted job without one is counted at its profile's size. `size` turns
/// a requested size into what the backend really allocates (see `Backend::effective_size`). Each
/// disk is named by its VM, for the backend's measurement (`Committed::measured`).
pub fn tally(
    holdings: &[Holding],
    profiles: &Profiles,
    size: impl Fn(Demand) -> Demand,
) -> Committed {
    let mut committed = Committed::default();
    for holding in holdings {
        committed.add_named(
            &size(demand_of(holding, profiles)),
            holding.booting,
            holding.vm.clone(),
        );
    }
    committed
}

/// What one holding is counted at: its sandbox row's resources, or its profile's size.
fn demand_of(holding: &Holding, profiles: &Profiles) -> Demand {
    match holding.resources {
        Some((vcpus, memory_mb, disk_gb)) => Demand {
            vcpus,
            memory_mb,
            disk_gb,
        },
        None => profiles
            .get(&holding.profile)
            .map(Demand::of)
            .unwrap_or_default(),
    }
}

/// Each holding's committed memory (as `tally` counts it) against the backend's measurement
/// (`Err`: why it failed), by VM name.
pub fn memory_view(
    holdings: &[Holding],
    profiles: &Profiles,
    size: impl Fn(Demand) -> Demand,
    measured: Result<&MemoryUsage, String>,
) -> MemoryStatus {
    let committed = holdings.iter().map(|holding| {
        (
            holding.vm.clone(),
            holding.booting,
            size(demand_of(holding, profiles)).memory_mb,
        )
    });
    MemoryStatus::of(committed, measured)
}

/// A backend's view of a requested size: what the VM really gets.
pub fn effective(backend: &dyn Backend, demand: Demand) -> Demand {
    let (vcpus, memory_mb) = backend.effective_size(demand.vcpus, demand.memory_mb);
    Demand {
        vcpus,
        memory_mb,
        ..demand
    }
}
