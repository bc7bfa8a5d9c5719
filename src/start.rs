//! The choice of how a job's sandbox starts: what the job asked for (`JobRequest::start`) against
//! what the backend can do (`Backend::snapshot_starts`) and what the tuning allows
//! (`snapshots.enabled`). The API checks it at submit, so a refusal is a 400 the client sees at
//! once; the lifecycle checks it again when it builds the sandbox, so a reload in between counts.

use crate::model::StartMode;

/// Why a job that asked for `start: snapshot` cannot have it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StartRefusal {
    #[error(
        "`start: snapshot` needs a backend that restores sandboxes from a snapshot, and this \
         daemon's backend boots every sandbox cold (only the local qemu backend, `backend: qemu` \
         in the config, restores); ask for `start: cold` or `auto`"
    )]
    BackendCannot,
    #[error(
        "`start: snapshot` is off on this host: the tuning sets `snapshots.enabled: false`; ask \
         for `start: cold` or `auto`, or set `snapshots.enabled: true` and reload the daemon \
         (SIGHUP)"
    )]
    SnapshotsDisabled,
}

/// How the backend should start the sandbox: `Cold` (boot it), `Snapshot` (restore it or fail)
/// or `Auto` (restore where it can, boot otherwise; only when both the backend and the tuning
/// allow snapshots). A request for `Snapshot` that neither allows is refused, the backend's
/// inability first: it is the one a reload cannot change.
pub fn resolve_start(
    requested: StartMode,
    backend_can: bool,
    tuning_enabled: bool,
) -> Result<StartMode, StartRefusal> {
    match requested {
        StartMode::Cold => Ok(StartMode::Cold),
        StartMode::Auto if backend_can && tuning_enabled => Ok(StartMode::Auto),
        StartMode::Auto => Ok(StartMode::Cold),
        StartMode::Snapshot if !backend_can => Err(StartRefusal::BackendCannot),
        StartMode::Snapshot if !tuning_enabled => Err(StartRefusal::SnapshotsDisabled),
        StartMode::Snapshot => Ok(StartMode::Snapshot),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StartMode::{Auto, Cold, Snapshot};

    #[test]
    fn every_request_against_every_host() {
        // (requested, backend can restore, tuning allows it) → what the backend is told.
        let table = [
            (Cold, false, false, Ok(Cold)),
            (Cold, false, true, Ok(Cold)),
            (Cold, true, false, Ok(Cold)),
            (Cold, true, true, Ok(Cold)),
            (Auto, false, false, Ok(Cold)),
            (Auto, false, true, Ok(Cold)),
            (Auto, true, false, Ok(Cold)),
            (Auto, true, true, Ok(Auto)),
            (Snapshot, false, false, Err(StartRefusal::BackendCannot)),
            (Snapshot, false, true, Err(StartRefusal::BackendCannot)),
            (Snapshot, true, false, Err(StartRefusal::SnapshotsDisabled)),
            (Snapshot, true, true, Ok(Snapshot)),
        ];
        for (requested, backend_can, tuning_enabled, want) in table {
            assert_eq!(
                resolve_start(requested, backend_can, tuning_enabled),
                want,
                "{requested} on backend_can={backend_can} tuning_enabled={tuning_enabled}"
            );
        }
    }

    #[test]
    fn a_refusal_says_why_and_names_what_to_change() {
        let backend = StartRefusal::BackendCannot.to_string();
        assert!(backend.contains("backend: qemu"), "{backend}");
        let tuning = StartRefusal::SnapshotsDisabled.to_string();
        assert!(tuning.contains("snapshots.enabled"), "{tuning}");
        for message in [backend, tuning] {
            assert!(message.contains("`start: cold` or `auto`"), "{message}");
        }
    }
}
